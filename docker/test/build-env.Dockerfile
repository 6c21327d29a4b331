# TEST ONLY. A layer between the superexec image and docker/Dockerfile for `make docker-test` on a machine
# whose https goes through its own CA and where PyTorch's CPU index cannot be reached: CPU torch from the
# machine's local wheel, and the machine's CA bundle for the `pip install .` of docker/Dockerfile. Images
# that users build (`docker compose build`) start from flwr/superexec directly and never see either.
#
# Build context: a folder holding ca.pem and wheels/torch-*.whl. (One stage on purpose: copying a venv
# from another stage merges directories, and the setuptools that torch upgrades would then be listed
# twice. The wheel's COPY layer stays in this test image.)
ARG BASE=flwr/superexec:1.41.0
FROM ${BASE}
COPY ca.pem /etc/fedsb-test/ca.pem
ENV PIP_CERT=/etc/fedsb-test/ca.pem
COPY wheels/ /tmp/wheels/
RUN python -m pip install --no-cache-dir /tmp/wheels/torch-*.whl

"""Fed-SB on your own model and data, inside your own Flower apps (README: "Your own model and data")."""

import os

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.handlers import FedSBClient
from fedsb.config import ConfigError, FedSBConfig
from fedsb.tasks import SeqClsTask
from fedsb.tasks.seq_cls import encode_texts
from server.driver import FedSBServer


class MyTask(SeqClsTask):
    @classmethod
    def default_model(cls) -> str:  # what `model = "default"` means: your local HF model folder
        if not os.environ.get("MY_MODEL_DIR"):
            raise ConfigError("model", "set MY_MODEL_DIR to your local Hugging Face model folder")
        return os.environ["MY_MODEL_DIR"]

    @classmethod
    def load_data(cls, cfg, model_path):  # your examples: any texts with integer labels
        texts = [f"{w} {x}" for w in ("good", "great", "bad", "awful") for x in range(150)]
        labels = [int(t.split()[0] in ("bad", "awful")) for t in texts]
        return encode_texts(texts, labels, ["positive", "negative"], model_path, cfg)


server_app, client_app = ServerApp(), ClientApp()
fedsb_client = FedSBClient(task_for=MyTask.load)  # query, train and evaluate handlers
client_app.query()(fedsb_client.query)
client_app.train()(fedsb_client.train)
client_app.evaluate()(fedsb_client.evaluate)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FedSBConfig.from_run_config(context.run_config)
    FedSBServer(grid, cfg, task=MyTask.load(cfg)).run()  # init, rounds, checkpoints, PEFT export


if __name__ == "__main__":  # MY_MODEL_DIR=/path/to/hf-model python examples/own_model.py: 3 simulated nodes
    from server.simulation import simulate

    MyTask.default_model()  # a missing MY_MODEL_DIR fails here, before the simulation starts
    print(simulate({"num-server-rounds": 3}, 3, client_app=client_app, server_app=server_app))

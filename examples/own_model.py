"""Fed-SB on your own model and data, inside your own Flower apps (README: "Your own model and data")."""

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.handlers import FedSBClient
from fedsb.config import FedSBConfig
from fedsb.tasks import SeqClsTask
from fedsb.tasks.seq_cls import encode_texts
from server.strategy import FedSB


class MyTask(SeqClsTask):  # the model is the run config's `model`: your local Hugging Face folder
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
    strategy = FedSB(cfg, task=MyTask.load(cfg))  # Flower's Strategy: wrap it, or start it as is
    strategy.start(grid=grid, num_rounds=cfg.num_server_rounds)  # init, rounds, checkpoints, PEFT export


if __name__ == "__main__":  # 3 simulated nodes; argv: the run config, e.g. "model='/path/to/hf-model'"
    import sys
    from server.simulation import parse_run_config, simulate

    print(simulate(parse_run_config(" ".join(sys.argv[1:])), 3, client_app=client_app, server_app=server_app))

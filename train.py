"""Train CoAtNet: python train.py [--config_path=FILE] [--key=value ...]"""
import src  # noqa: F401  (sets the CPU ISA default before mindspore loads)
from src.model_utils.config import load_config
from src.model_utils.moxing_adapter import moxing_wrapper, upload_outputs
from src.trainer import train
from src.utils import cli_main, setup_context


def main(argv=None) -> None:
    config = load_config(argv)
    run = setup_context(config)
    moxing_wrapper(config, restore_outputs=True)(lambda: train(config, run, upload=lambda: upload_outputs(config)))()


if __name__ == "__main__":
    raise SystemExit(cli_main(main))

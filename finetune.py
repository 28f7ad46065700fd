"""Fine-tune CoAtNet at a higher resolution (the seed's 224 -> 384 recipe):

    python finetune.py --pretrained=CKPT [--key=value ...]

The seed's fine-tune settings below replace the defaults; each can still be set with --key=value.
"""
import src  # noqa: F401  (sets the CPU ISA default before mindspore loads)
from src.checkpoint import CheckpointError
from src.model_utils.config import load_config
from src.model_utils.moxing_adapter import fetch_checkpoint, moxing_wrapper, upload_outputs
from src.trainer import train
from src.utils import cli_main, load_pretrained, setup_context

FINETUNE = dict(image_height=384, image_width=384, center_crop=False, batch_size=16, num_epochs=30,
                lr_max=0.00005, lr_min=0.00005, lr_warmup_epochs=0, weight_decay=0.00000001, enable_ema=True,
                ema_decay=0.999975, enable_clip_norm=True, gradient_norm=1.0)


def main(argv=None) -> None:
    config = load_config(argv, overrides=FINETUNE)
    run = setup_context(config)
    if not config.pretrained and not config.checkpoint_url:
        raise CheckpointError("finetune.py needs --pretrained=CKPT (or --checkpoint_url on ModelArts)")

    def init(net, logger):
        load_pretrained(net, config.pretrained, config.use_ema, logger)

    pre = (lambda: fetch_checkpoint(config, "pretrained")) if config.checkpoint_url else None
    moxing_wrapper(config, pre_process=pre, restore_outputs=True)(
        lambda: train(config, run, init_weights=init, upload=lambda: upload_outputs(config)))()


if __name__ == "__main__":
    raise SystemExit(cli_main(main))

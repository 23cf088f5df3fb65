"""The supervised warm start on CPU through verl's own SFT trainer (``verl.trainer.sft_trainer``).

    python -m recipe.learn.sft data.train_files=outputs/learn/sft/train.parquet \
        model.path=outputs/smollm2 trainer.default_local_dir=outputs/learn/sft/ckpt

Composes verl's ``sft_trainer_engine`` config with ``configs/sft_cpu.yaml`` and the command
line's Hydra overrides, then runs ``verl.trainer.sft_trainer.SFTTrainer`` as a one-process
``torch.distributed`` world (gloo on 127.0.0.1), on the recipe's ``cpu`` platform
(``recipe/verl_plugin``, the same one the RL trainer uses). The dataset is verl's
``MultiTurnSFTDataset`` (a ``messages`` column; loss on assistant turns only). The
checkpoint includes ``hf_model``: ``<default_local_dir>/global_step_N/huggingface`` is a
Hugging Face model directory the rollout server and the RL trainer load
(``final_hf_model`` finds it). Re-running resumes from the last checkpoint (verl's
``resume_mode=auto``).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CPU_OVERRIDES = ROOT / "configs" / "sft_cpu.yaml"



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compose(overrides: list[str]):
    """verl's SFT config <- configs/sft_cpu.yaml <- ``overrides`` (Hydra ``key=value``).

    Raises:
        omegaconf.errors.ConfigAttributeError / hydra errors: an unknown key, named.
    """
    import verl.trainer
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    config_dir = str(Path(verl.trainer.__file__).parent / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = hydra_compose(config_name="sft_trainer_engine")
    OmegaConf.set_struct(cfg, True)
    # verl's open mapping: any transformers config field may go here.
    OmegaConf.set_struct(cfg.model.override_config, False)
    cfg = OmegaConf.merge(cfg, OmegaConf.load(CPU_OVERRIDES))
    # Dot-list overrides through OmegaConf in struct mode: a misspelt key fails with its name.
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def final_hf_model(ckpt_dir: str | Path, *, component: str = "", min_step: int = 0) -> Path:
    """The Hugging Face model of the latest verl checkpoint under ``ckpt_dir``:
    ``global_step_N/<component>/huggingface`` (``component="actor"`` for the PPO trainer's), N >= ``min_step``.

    Raises:
        FileNotFoundError: no such directory with weights there.
    """
    steps = sorted(Path(ckpt_dir).glob("global_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    for step in reversed(steps):
        hf = step / component / "huggingface"
        if int(step.name.rsplit("_", 1)[1]) >= min_step and (
                any(hf.glob("*.safetensors")) or (hf / "pytorch_model.bin").is_file()):
            return hf
    raise FileNotFoundError(f"no global_step_*/{component + '/' if component else ''}huggingface model "
                            f"with weights (step >= {min_step}) under {ckpt_dir}")


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    from recipe.train import cpu_platform_env, keep_previous_log

    # What verl's cpu platform needs in this process before verl is imported: the RL trainer's values.
    for key, value in cpu_platform_env().items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("VERL_FILE_LOGGER_PATH"):
        keep_previous_log(Path(os.environ["VERL_FILE_LOGGER_PATH"]))
    # A one-process world, as torchrun would describe it.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    cfg = compose(overrides)
    import torch.distributed
    from verl.trainer.sft_trainer import SFTTrainer

    # verl's run_sft would build the backend "cpu:gloo,cpu:gloo" on the cpu platform, which torch
    # rejects (recipe/verl_plugin/internals.py, gloo_process_group); the rest is run_sft's.
    torch.distributed.init_process_group(backend="cpu:gloo")
    try:
        SFTTrainer(config=cfg).fit()
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training entry: verl's PPO/GRPO trainer with the ``swe_agent`` config section.

    python -m recipe.train [--dry-run] key=value ...

Composes ``configs/swe_agent_trainer.yaml`` (verl's ``ppo_trainer`` + our section)
with Hydra overrides, validates the ``swe_agent`` section against
``recipe.config.SWEAgentConfig`` (unknown keys fail here, with their names, not
inside a Ray worker minutes later), resolves every interpolation on the driver,
and hands the config to ``verl.trainer.main_ppo``. ``--dry-run`` prints the
composed config and exits without importing Ray or touching a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recipe.config import load_swe_agent_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
CONFIG_NAME = "swe_agent_trainer"


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed, resolved trainer config.

    Raises:
        hydra.errors.ConfigCompositionException: a bad override (unknown verl key, bad syntax).
        omegaconf.errors.ConfigKeyError: an unknown ``swe_agent`` key (named in the message).
    """
    if not OmegaConf.has_resolver("swe_rl_root"):
        OmegaConf.register_new_resolver("swe_rl_root", lambda: str(ROOT))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=CONFIG_NAME, overrides=overrides)
    # Ray workers resolve the config again without our resolver: resolve it here.
    OmegaConf.resolve(cfg)
    load_swe_agent_config(cfg.swe_agent)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the composed config and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.n_gpus_per_node=4")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose_config(args.overrides)
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout the config alone
            _validate_for_verl(cfg)
    except (ConfigCompositionException, OmegaConfBaseException, ValueError, AssertionError) as exc:
        print(f"recipe.train: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(OmegaConf.to_yaml(cfg))
        return 0

    # Same steps as verl.trainer.main_ppo.main, which is wrapped by @hydra.main and cannot take a config.
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.utils.device import auto_set_device

    auto_set_device(cfg)
    run_ppo(cfg, task_runner_class=TaskRunnerV1)
    return 0


def _validate_for_verl(cfg: DictConfig) -> None:
    """verl's own consistency checks (batch sizes, lengths...); cheap and GPU-free.

    Raises:
        ValueError / AssertionError: as raised by ``verl.utils.config.validate_config``.
    """
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from recipe.advantage import register

    register()  # the driver may look the estimator up too
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


if __name__ == "__main__":
    sys.exit(main())

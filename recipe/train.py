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
import os
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
    # Ray workers do not share the driver's working directory: a relative output path would land
    # somewhere else for each of them. Anchor it here (what depends on it follows by interpolation).
    local_dir = str(cfg.trainer.default_local_dir)
    if not os.path.isabs(local_dir) and not local_dir.startswith("${"):
        cfg.trainer.default_local_dir = os.path.join(os.getcwd(), local_dir)
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
        _export_platform_env(cfg)
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout the config alone
            _validate_for_verl(cfg)
        check_cpu_precision(cfg)
    except (ConfigCompositionException, OmegaConfBaseException, ValueError, AssertionError) as exc:
        print(f"recipe.train: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(OmegaConf.to_yaml(cfg))
        return 0
    try:
        check_policy_tokens(cfg)
        # Every reach into verl internals, checked here before Ray starts (each worker checks again).
        from recipe.verl_plugin.internals import check_all

        check_all()
    except (ValueError, RuntimeError) as exc:
        print(f"recipe.train: {exc}", file=sys.stderr)
        return 2

    # Same steps as verl.trainer.main_ppo.main, which is wrapped by @hydra.main and cannot take a config.
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.utils.device import auto_set_device

    auto_set_device(cfg)
    _keep_previous_metrics(cfg)
    if cfg.trainer.use_v1:
        run_ppo(cfg, task_runner_class=TaskRunnerV1)
    else:
        from verl.trainer.main_ppo_v0 import TaskRunner

        run_ppo(cfg, task_runner_class=TaskRunner)
    return 0


# Variables verl reads at import or platform resolution: the driver needs them as the Ray workers do.
_PLATFORM_ENV = ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES", "VERL_ENGINE_DEVICE")


def _export_platform_env(cfg: DictConfig) -> None:
    """Set the profile's platform variables (``ray_kwargs.ray_init.runtime_env.env_vars``) in this process.

    Must run before verl is imported: verl loads ``VERL_USE_EXTERNAL_MODULES`` in its
    ``__init__`` and resolves the platform once per process.
    """
    env_vars = OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars") or {}
    for key in _PLATFORM_ENV:
        if key in env_vars:
            os.environ[key] = str(env_vars[key])
    if "verl" in sys.modules and os.environ.get("VERL_USE_EXTERNAL_MODULES"):
        import importlib

        for module in os.environ["VERL_USE_EXTERNAL_MODULES"].split(","):
            importlib.import_module(module.strip())


def cpu_platform_env() -> dict[str, str]:
    """The platform variables (``_PLATFORM_ENV``) a CPU run sets, as the trainer config and its CPU
    profile give them (``ray_kwargs.ray_init.runtime_env.env_vars``), for processes outside Ray."""
    env: dict[str, str] = {}
    for path in (CONFIG_DIR / f"{CONFIG_NAME}.yaml", CONFIG_DIR / "profile" / "cpu.yaml"):
        env_vars = OmegaConf.select(OmegaConf.load(path), "ray_kwargs.ray_init.runtime_env.env_vars") or {}
        # Key by key: the section's other values interpolate keys of the whole config.
        env.update({key: str(env_vars[key]) for key in _PLATFORM_ENV if key in env_vars})
    return env


def _keep_previous_metrics(cfg: DictConfig) -> None:
    """``keep_previous_log`` for the run's ``VERL_FILE_LOGGER_PATH``."""
    env_vars = OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars") or {}
    keep_previous_log(Path(str(env_vars.get("VERL_FILE_LOGGER_PATH") or os.environ.get("VERL_FILE_LOGGER_PATH") or "")))


def keep_previous_log(path: Path) -> None:
    """verl's ``file`` logger truncates its file: a resumed run moves the earlier one aside first.

    ``metrics.jsonl`` becomes ``metrics.1.jsonl`` (then ``.2``...); ``recipe.metrics.read_trainer_log``
    reads them all, newest last.
    """
    if not path.name or not path.is_file():
        return
    n = 1
    while path.with_suffix(f".{n}{path.suffix}").exists():
        n += 1
    path.rename(path.with_suffix(f".{n}{path.suffix}"))


def check_policy_tokens(cfg: DictConfig) -> None:
    """Check that the configured continuous-token builder reproduces the policy's chat template.

    Loads the tokenizer of ``actor_rollout_ref.model.path`` (with verl's
    ``custom_chat_template`` when set), as every rollout worker will.

    Raises:
        model_proxy.token_check.TokenBuilderMismatch: (a ValueError) naming the setting to change.
    """
    from transformers import AutoConfig, AutoTokenizer

    from model_proxy.token_check import make_token_builder

    model = cfg.actor_rollout_ref.model
    trust = bool(model.get("trust_remote_code", False))
    tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=trust)
    if model.get("custom_chat_template"):
        tokenizer.chat_template = model.custom_chat_template
    model_type = getattr(AutoConfig.from_pretrained(model.path, trust_remote_code=trust), "model_type", None)
    make_token_builder(tokenizer, family=cfg.swe_agent.proxy.token_builder, hf_model_type=model_type)


# FSDP engine sections whose mixed precision decides the dtype of every training matmul.
_FSDP_SECTIONS = ("actor_rollout_ref.actor", "actor_rollout_ref.ref", "critic")
# CPU flags with native bf16/fp16 matrix math (oneDNN uses them); without them ATen falls back to
# its reference GEMM (at::native::cpublas::gemm_stub), single-threaded.
_HALF_MATMUL_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def check_cpu_precision(cfg: DictConfig, cpu_flags: set[str] | None = None) -> None:
    """Refuse half-precision FSDP training on a CPU without half-precision matrix units.

    verl's FSDP engine defaults to ``mixed_precision.param_dtype=bf16`` with bf16 autocast
    (``verl/workers/engine/fsdp/transformer_impl.py``). On an AVX2 CPU every bf16 matmul then
    runs ATen's reference GEMM: measured here, SmolLM2-135M's update took ~290 ms per token
    instead of ~25 with fp32. The CPU profile sets fp32 (``configs/profile/cpu.yaml``).

    Raises:
        ValueError: ``trainer.device=cpu`` and a used FSDP section's param dtype is bf16/fp16
            while the CPU lacks ``_HALF_MATMUL_FLAGS``; the message names the key and the fix.
    """
    if str(OmegaConf.select(cfg, "trainer.device", default="")) != "cpu":
        return
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if any(flag in flags for flag in _HALF_MATMUL_FLAGS):
        return
    for section in _FSDP_SECTIONS:
        if OmegaConf.select(cfg, f"{section}.strategy", default=None) not in ("fsdp", "fsdp2"):
            continue
        if section == "critic" and not OmegaConf.select(cfg, "critic.enable", default=False):
            continue
        mixed = OmegaConf.select(cfg, f"{section}.fsdp_config.mixed_precision", default=None)
        dtype = str((mixed or {}).get("param_dtype", "bf16"))
        if dtype in ("bf16", "bfloat16", "fp16", "float16"):
            raise ValueError(
                f"{section}.fsdp_config.mixed_precision.param_dtype is {dtype} (verl's default when unset) on a "
                "CPU without bf16/fp16 matrix units: every matmul would run ATen's slow reference GEMM. Set "
                f"{section}.fsdp_config.mixed_precision={{param_dtype: fp32, reduce_dtype: fp32, buffer_dtype: fp32}} "
                "(configs/profile/cpu.yaml does)")


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

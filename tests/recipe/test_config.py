"""The swe_agent config: documented defaults match the schema, bad keys fail by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from recipe.config import Policy, SWEAgentConfig, load_swe_agent_config
from sandbox.shim import ShimSettings
from recipe.outcome import ExitStatus, from_mini_swe_agent
from recipe.rollout import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_yaml_defaults_equal_schema_defaults():
    from_yaml = load_swe_agent_config(OmegaConf.load(CONFIGS / "swe_agent.yaml"))
    assert from_yaml == SWEAgentConfig()


def test_overrides_merge_in_order():
    cfg = load_swe_agent_config({"agent": {"step_limit": 5}}, {"policy": "reference"})
    assert cfg.agent.step_limit == 5 and Policy(cfg.policy) is Policy.REFERENCE
    assert cfg.agent.rollout_timeout_s == SWEAgentConfig().agent.rollout_timeout_s


def test_unknown_key_fails_with_its_name():
    with pytest.raises(ConfigKeyError, match="step_limt"):
        load_swe_agent_config({"agent": {"step_limt": 5}})


def test_wrong_type_fails():
    with pytest.raises(ValidationError, match="step_limit"):
        load_swe_agent_config({"agent": {"step_limit": "many"}})


def test_unknown_policy_fails_with_choices():
    with pytest.raises(ValueError, match="reference"):
        load_swe_agent_config({"policy": "gold"})


def test_rollout_cli_rejects_unknown_keys():
    assert load_config(["concurrency=2"]).concurrency == 2
    with pytest.raises(ConfigKeyError, match="concurency"):
        load_config(["concurency=2"])


@pytest.mark.parametrize(
    ("raw", "ours"),
    [
        ("Submitted", ExitStatus.SUBMITTED),
        ("LimitsExceeded", ExitStatus.STEP_LIMIT),
        ("TimeExceeded", ExitStatus.ROLLOUT_TIMEOUT),
        ("ContextWindowExceededError", ExitStatus.CONTEXT_LIMIT),
        ("RepeatedFormatError", ExitStatus.AGENT_ERROR),
        ("APIConnectionError", ExitStatus.PROXY_ERROR),
        ("KeyError", ExitStatus.AGENT_ERROR),
    ],
)
def test_mini_swe_agent_statuses_map_to_closed_set(raw, ours):
    assert from_mini_swe_agent(raw) is ours


def test_limit_and_infra_classes():
    assert {s for s in ExitStatus if s.is_limit} == {
        ExitStatus.STEP_LIMIT, ExitStatus.CONTEXT_LIMIT, ExitStatus.ROLLOUT_TIMEOUT}
    assert {s for s in ExitStatus if s.is_infra_failure} == {
        ExitStatus.SANDBOX_ERROR, ExitStatus.PROXY_ERROR, ExitStatus.REWARD_ERROR}


def test_a_typo_in_the_shim_section_fails_at_start_up_with_the_closest_key():
    # Before: the dict reached ResourceShim in every rollout, a TypeError there became a masked
    # sandbox_error per rollout and training went on with no signal.
    with pytest.raises(ConfigKeyError, match=r"did you mean sandbox\.shim\.pool_bytes"):
        load_swe_agent_config({"sandbox": {"shim": {"enabled": True, "pool_byte": 1 << 30}}})
    with pytest.raises(ValueError, match="cgroup_backend 'v3'"):
        load_swe_agent_config({"sandbox": {"shim": {"cgroup_backend": "v3"}}})
    shim = load_swe_agent_config({"sandbox": {"shim": {"enabled": True, "pool_bytes": 1 << 30}}}).sandbox.shim
    assert type(shim) is ShimSettings and shim.enabled and shim.pool_bytes == 1 << 30


def test_a_sandbox_backend_the_loop_cannot_run_is_refused():
    # Before: the key was read by nothing, so any backend silently ran local sandboxes.
    with pytest.raises(ValueError, match=r"swe_agent\.sandbox\.backend='kubernetes'"):
        load_swe_agent_config({"sandbox": {"backend": "kubernetes"}})
    assert load_swe_agent_config({"sandbox": {"backend": "docker"}}).sandbox.backend == "docker"
    with pytest.raises(ValueError, match="SWE-agent brings its own deployment"):
        load_swe_agent_config({"sandbox": {"backend": "docker"}, "agent": {"backend": "swe_agent"}})


def test_reward_section_is_the_graders_config_with_one_default():
    from reward.config import RewardConfig

    cfg = load_swe_agent_config(OmegaConf.load(CONFIGS / "swe_agent.yaml"))
    assert type(cfg.reward) is RewardConfig and cfg.reward == RewardConfig()
    assert cfg.reward.fail_fast  # the training path's default, the same in verl's compute_score
    assert load_swe_agent_config({"reward": {"fail_fast": False, "run_as_uid": None}}).reward == RewardConfig(
        fail_fast=False, run_as_uid=None)


def test_unknown_keys_name_the_closest_valid_one():
    with pytest.raises(ConfigKeyError, match=r"did you mean reward\.fail_fast"):
        load_swe_agent_config({"reward": {"fail_fst": True}})
    with pytest.raises(ConfigKeyError, match=r"did you mean agent\.step_limit"):
        load_swe_agent_config({"agent": {"step_limt": 5}})
    with pytest.raises(ValueError, match="reward variant 'bogus'"):
        load_swe_agent_config({"reward": {"variant": "bogus"}})
    with pytest.raises(ValueError, match="protect=false"):
        load_swe_agent_config({"reward": {"protect": False}})


def test_verls_reward_kwargs_refuse_unknown_keys():
    from reward.compute_score import compute_score

    with pytest.raises(ValueError, match=r"reward_kwargs\.timout_s: unknown reward setting \(did you mean 'timeout_s'\?\)"):
        compute_score("swe", "", "", extra_info={"instance_id": "x"}, timout_s=5)


def _leaf_settings(cls, prefix: str = "swe_agent") -> list[tuple[str, str]]:
    """(dotted YAML key, field name) of every leaf setting of a schema dataclass."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _leaf_settings(type(default), f"{prefix}.{f.name}")
        else:
            out.append((f"{prefix}.{f.name}", f.name))
    return out


def test_every_setting_is_read_by_something():
    """A key nothing reads is a silent setting: each leaf of the schema is read as an attribute
    (``.name``) somewhere in the project's code outside the schema classes themselves."""
    import re

    root = CONFIGS.parent
    schema_files = {root / "recipe" / "config.py"}
    sources = "\n".join(p.read_text() for package in ("recipe", "sandbox", "reward", "model_proxy", "core")
                        for p in (root / package).rglob("*.py") if p not in schema_files)
    unread = [key for key, name in _leaf_settings(SWEAgentConfig)
              if not re.search(rf"\.{name}\b", sources)]
    assert not unread, f"settings nothing reads: {unread}"

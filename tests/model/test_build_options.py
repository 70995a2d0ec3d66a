"""Build options are checked once, where the public call begins, every problem at once (issue 21)."""

from __future__ import annotations

import pytest

import qolora
from qolora import ConfigError
from qolora.model.build_options import BuildOptions


def test_every_problem_is_listed_at_once():
    built, problems = BuildOptions.parse(gradient_checkpointing="sometimes", offload="gpu", kernels="fast",
                                         offload_embedding="yes", offload_plan=["seq_len"])
    assert built is None and len(problems) == 5
    text = "\n".join(problems)
    for named in ("gradient_checkpointing='sometimes'", "offload='gpu'", "kernels='fast'",
                  "offload_embedding='yes'", "offload_plan=['seq_len']"):
        assert named in text


def test_values_are_normalised_once():
    built = BuildOptions.checked(gradient_checkpointing="12", offload="none", gpu_memory=None, kernels="off")
    assert (built.gradient_checkpointing, built.offload, built.kernels) == (12, None, "off")
    auto = BuildOptions.checked(offload="auto", gpu_memory="24GiB", gradient_checkpointing="auto")
    assert auto.gpu_memory == 24 << 30 and auto.gradient_checkpointing == "auto"
    with pytest.raises(ConfigError, match="gpu_memory"):  # only offload="auto" uses it
        BuildOptions.checked(gpu_memory="24GiB")


@pytest.mark.usefixtures("no_weight_reads")
def test_prepare_and_load_refuse_before_reading_anything(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError) as caught:
        qolora.prepare(tiny_llama_dir, offload="gpu", kernels="fast")
    assert len(caught.value.problems) == 2  # both, in one error
    with pytest.raises(ConfigError, match="gpu_memory"):  # load took gpu_memory without offload="auto" silently
        qolora.load(tiny_llama_dir, tmp_path / "no-adapter", gpu_memory="8GiB")


def test_an_offload_plan_is_checked_with_the_other_build_options():
    with pytest.raises(ConfigError, match="FSDP shards the base"):
        BuildOptions.checked(offload="auto", gpu_memory="24GiB", offload_plan={"fsdp": True, "num_gpus": 2})
    with pytest.raises(ConfigError, match="unknown option"):
        BuildOptions.checked(offload="auto", gpu_memory="24GiB", offload_plan={"seqlen": 512})
    built = BuildOptions.checked(offload="auto", gpu_memory="24GiB", gradient_checkpointing="on",
                                 offload_plan={"seq_len": 512, "grad_accum": 4})
    assert (built.offload_plan.seq_len, built.offload_plan.grad_accum) == (512, 4)
    assert built.offload_plan.gradient_checkpointing is True  # the build's own, unless the plan names one

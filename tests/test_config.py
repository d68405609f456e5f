"""pipemax/config.py: each RunConfig field is declared once, with its flag."""
from __future__ import annotations

import dataclasses

import pytest

from pipemax.config import ConfigError, RunConfig, build_parser, from_args


def test_every_field_is_one_flag_and_the_flag_defaults_give_the_field_defaults():
    parser = build_parser()
    options = {a.dest for a in parser._actions if a.dest != "help"}
    names = [f.name for f in dataclasses.fields(RunConfig)]
    assert len(options) == len(names)
    assert options == {n if n != "overrides" else "override" for n in names}
    cfg = from_args(["--device", "cpu"])
    assert cfg == RunConfig()            # no flag given: the field defaults (on the CPU)


def test_each_flag_reaches_its_field_converted():
    cfg = from_args(["--device", "cpu", "--gpus", "3", "--override", "num_layers=2",
                     "--override", "hidden_size=64", "--offload-overlap", "off",
                     "--prefix-caching", "off", "--cuda-graphs", "on",
                     "--device-figures", "hbm_gbs=3,tflops=2", "--progress-interval", "2.5",
                     "--quiet", "--no-socket"])
    assert (cfg.gpus, cfg.overrides) == (3, ("num_layers=2", "hidden_size=64"))
    assert not cfg.offload_overlap and not cfg.prefix_caching and cfg.cuda_graphs
    assert cfg.device_figures == (("hbm_gbs", 3.0), ("tflops", 2.0))
    assert cfg.progress_interval == 2.5 and cfg.quiet and cfg.no_socket
    assert from_args(["--device", "cpu", "--cuda-graphs", "auto"]).cuda_graphs is False
    with pytest.raises(ConfigError, match="'hbm_gbs=x' is not key=number"):
        from_args(["--device", "cpu", "--device-figures", "hbm_gbs=x"])
    with pytest.raises(SystemExit):
        from_args(["--device", "cpu", "--kv-offload", "maybe"])

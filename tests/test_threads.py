"""CPU threading chosen by the CLI itself: passive waiting, threads from the cores actually available."""

import os
import subprocess
import sys

from concept_erase.threads import (available_cores, cgroup_cpu_limit, configure_threads, default_threads,
                                   threads_from_argv)


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2, (tmp_path / "no", tmp_path / "no")) == 1.5
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, (tmp_path / "no", tmp_path / "no")) is None
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("300000")
    period.write_text("100000")
    assert cgroup_cpu_limit(tmp_path / "missing", (quota, period)) == 3.0
    quota.write_text("-1")
    assert cgroup_cpu_limit(tmp_path / "missing", (quota, period)) is None


def test_available_cores_is_capped_by_affinity_and_quota():
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(limit=1000.0) == affinity
    assert available_cores(limit=0.5) == 1  # a fractional quota still gets one thread


def test_default_threads_share_cores_among_local_processes():
    assert default_threads({}, cores=4) == 4
    assert default_threads({"LOCAL_WORLD_SIZE": "2"}, cores=4) == 2
    assert default_threads({"LOCAL_WORLD_SIZE": "8"}, cores=4) == 1


def test_configure_threads_sets_passive_wait_and_respects_the_user():
    import torch

    before = torch.get_num_threads()
    try:
        env = {}
        assert configure_threads(None, env, cores=3) == 3
        assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "3"
        assert torch.get_num_threads() == 3  # torch already loaded: its intra-op pool follows
        env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}
        assert configure_threads(None, env, cores=3) == 2  # the user's choices win over ours
        assert env["OMP_WAIT_POLICY"] == "ACTIVE"
        assert configure_threads(1, env, cores=3) == 1  # and --threads wins over everything
        assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_threads_from_argv():
    assert threads_from_argv(["generate", "--threads", "3", "--model", "minisd"]) == 3
    assert threads_from_argv(["generate", "--threads=2"]) == 2
    assert threads_from_argv(["generate", "--threads", "zero"]) is None
    assert threads_from_argv(["generate", "--", "--threads", "2"]) is None
    assert threads_from_argv(["generate"]) is None


def test_a_fresh_process_gets_the_settings_before_torch_loads():
    """The environment must be in place before libgomp reads it, i.e. before `import torch`."""
    code = ("from concept_erase.threads import configure_threads; configure_threads(1); import os, torch; "
            "print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["1", "PASSIVE"]


def test_every_command_has_threads_and_refuses_a_bad_value(capsys, tmp_path):
    from concept_erase.cli import _leaf_parsers, build_parser, main

    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) >= 10
    for leaf in leaves:
        assert any("--threads" in a.option_strings for a in leaf._actions), leaf.prog
    assert main(["generate", "--model", "minisd", "--prompt", "x", "--output", str(tmp_path / "o"),
                 "--threads", "-1"]) == 2
    assert "--threads must be >= 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

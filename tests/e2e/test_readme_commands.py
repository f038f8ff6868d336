"""Every command the README gives runs in CI, at least as a quick smoke run, so none can rot
unseen: the README's commands are extracted and each must be listed in RUN_BY with the test that
runs it; the ones no other test runs are smoke-run here."""

from __future__ import annotations

import re
import subprocess

from ..conftest import REPO, run_cli

PACKAGE = REPO / "platform" / "ditforge"
GROUPS = ("services", "cluster", "data")  # verbs with sub-commands

# README command → the test that runs it (file::function). Commands only a real cluster, cloud or
# GPU can run are run here against what CI has: the embedded / local cluster, the CPU.
RUN_BY = {
    "make test": ".ci/run",  # CI itself
    "make test-fast": "tests/e2e/test_readme_commands.py::test_make_targets_run_what_the_readme_says",
    "make down": "tests/e2e/test_readme_commands.py::test_make_targets_run_what_the_readme_says",
    "make fault": "tests/e2e/test_readme_commands.py::test_make_targets_run_what_the_readme_says",
    "make bench": "tests/e2e/test_bench.py::test_make_bench_quick_runs_every_section",
    "make docs": ".ci/run",  # CI builds the docs with --strict before the tests
    "make lint": ".ci/run",  # and lints before them
    "make demo": "tests/e2e/test_jobs_e2e.py::test_make_demo_runs_the_demo_command",
    "ditforge demo": "tests/e2e/test_jobs_e2e.py::test_demo_command_runs_the_demo_spec_end_to_end",
    "ditforge register": "tests/e2e/test_train_e2e.py::test_register_redoes_a_failed_registration",
    "ditforge bench": "tests/e2e/test_bench.py::test_make_bench_quick_runs_every_section",
    "python -m ditforge.bench.train": "tests/e2e/test_bench.py::test_make_bench_quick_runs_every_section",
    "python -m ditforge.bench.data": "tests/e2e/test_bench.py::test_make_bench_quick_runs_every_section",
    "ditforge validate": "tests/unit/test_spec.py::test_shipped_specs_validate",
    "ditforge submit": "tests/e2e/test_train_e2e.py::test_zero2_run_logs_to_one_mlflow_run_and_checkpoints_to_s3",
    "ditforge status": "tests/e2e/test_cluster_local.py::test_local_cluster_lifecycle",
    "ditforge logs": "tests/e2e/test_cluster_local.py::test_local_cluster_lifecycle",
    "ditforge stop": "tests/e2e/test_cluster_local.py::test_local_cluster_lifecycle",
    "ditforge ui": "tests/e2e/test_readme_commands.py::test_ui_and_services_commands",
    "ditforge services up": "tests/e2e/test_readme_commands.py::test_ui_and_services_commands",
    "ditforge services status": "tests/e2e/test_readme_commands.py::test_ui_and_services_commands",
    "ditforge services down": "tests/e2e/test_readme_commands.py::test_ui_and_services_commands",
    "ditforge sample": "tests/e2e/test_train_e2e.py::test_registered_model_samples_and_exports",
    "ditforge export": "tests/e2e/test_train_e2e.py::test_registered_model_samples_and_exports",
    "ditforge model-info": "tests/unit/test_jobs.py::test_model_info_cli_json",
    "ditforge data ingest": "tests/e2e/test_readme_commands.py::test_data_encode_and_verify_commands",
    "ditforge data encode": "tests/e2e/test_readme_commands.py::test_data_encode_and_verify_commands",
    "ditforge data verify": "tests/e2e/test_readme_commands.py::test_data_encode_and_verify_commands",
    "ditforge cluster up": "tests/e2e/test_cluster_local.py::test_local_cluster_lifecycle",
    "ditforge cluster status": "tests/e2e/test_cluster_local.py::test_local_cluster_lifecycle",
    "ditforge cluster down": "tests/e2e/test_cluster_local.py::test_local_cluster_lifecycle",
    "ditforge cluster render": "tests/unit/test_cluster_render.py::test_cli_render_and_up_print_the_command",
    "ditforge cluster join": "tests/unit/test_cluster_join.py::test_bad_join_is_one_line_exit_2_within_30s",
    "ditforge cluster leave": "tests/unit/test_cluster_join.py::test_leave_when_not_joined",
    "python -m ditforge.bench.report": "tests/e2e/test_bench.py::test_make_bench_quick_runs_every_section",
}


# README commands CI does not run yet, each with the reason: the list is asserted exactly, so a
# new gap fails the test and a closed one must be removed from here.
NOT_RUN: dict[str, str] = {}


def readme_commands() -> set[str]:
    """The command (program, verb, sub-verb) of every command line in the README and the docs
    pages: lines of code blocks and inline code that start with `ditforge `, `make ` or
    `python -m ditforge`."""
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))])
    snippets = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        snippets += block.splitlines()
    keys = set()
    for s in snippets:
        s = s.strip().removeprefix("$ ").replace("\\|", "|")
        words = s.split()
        if len(words) >= 2 and words[0] == "make":
            keys.add(f"make {words[1]}")
        elif len(words) >= 3 and words[:2] == ["python", "-m"] and words[2].startswith("ditforge"):
            keys.add(f"python -m {words[2]}")
        elif len(words) >= 2 and words[0] == "ditforge" and re.fullmatch(r"[a-z][a-z|-]*", words[1]):
            if words[1] in GROUPS and len(words) >= 3:
                keys |= {f"ditforge {words[1]} {sub}" for sub in words[2].split("|")}
            else:
                keys |= {f"ditforge {verb}" for verb in words[1].split("|")}
    return keys


def test_every_readme_command_is_run_by_a_test():
    keys = readme_commands()
    assert {
        "make bench",
        "make docs",
        "ditforge data verify",
        "ditforge services status",
        "python -m ditforge.bench.data",
    } <= keys
    missing = keys - set(RUN_BY)
    assert missing == set(NOT_RUN), f"README commands no test runs (add them to RUN_BY with a test): {sorted(missing)}"
    for key, where in RUN_BY.items():
        if "::" in where:
            path, name = where.split("::")
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), (key, where)
        else:
            assert (REPO / where).exists(), (key, where)


def test_make_targets_run_what_the_readme_says():
    """`make test-fast`, `make fault`, `make bench`, `make down` (dry run: the command each would run)."""

    def recipe(*args: str) -> str:
        out = subprocess.run(
            ["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    assert recipe("test-fast").endswith("pytest -q tests/unit")
    assert recipe("down").endswith("ditforge services down")
    assert recipe("fault").endswith("pytest -q -rs --durations=0 -m fault")
    assert recipe("bench").endswith("ditforge bench --json bench.json")
    assert recipe("bench", "BENCH_ARGS=--quick").endswith("ditforge bench --json bench.json --quick")
    # `make test`: the hosts lane in the background; two xdist workers for the rest but the serial
    # tests, then those alone
    test = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert " -m hosts " in test and "& hosts=$!" in test and "wait $hosts" in test, test
    assert '-n 2 --dist loadfile --no-loadscope-reorder -m "not serial and not hosts"' in test, test
    assert ' -m "serial and not hosts" ' in test, test
    markers = (REPO / "pyproject.toml").read_text()
    assert all(f'"{m}:' in markers for m in ("slow", "fault", "serial", "hosts"))  # the markers the targets select


def test_ui_and_services_commands(embedded, tmp_path):
    r = run_cli("ui", timeout=300)
    link = f"{embedded.mlflow}/#/experiments?workflowType=machine_learning"  # the model-training view
    assert r.returncode == 0 and r.stdout.strip() == link, r.stdout + r.stderr
    r = run_cli("services", "up", timeout=300)  # reuses what runs
    assert r.returncode == 0 and embedded.s3 in r.stdout, r.stdout + r.stderr
    r = run_cli("services", "status", timeout=300)
    assert r.returncode == 0 and r.stdout.count("yes") >= 3, r.stdout + r.stderr
    # `down` in a home of its own: the suite's services keep running
    r = run_cli("services", "down", timeout=300, env={"DITFORGE_HOME": str(tmp_path / "home")})
    assert r.returncode == 0 and "stopped: nothing was running" in r.stdout, r.stdout + r.stderr


def test_data_encode_and_verify_commands(embedded, tmp_path):
    """`data ingest` → `data encode` → `data verify`, tiny, on file://. RAY_ADDRESS attaches them to
    the suite's Ray head (README: Parallel and resumable) instead of starting a private Ray each."""
    pixels, latents = f"file://{tmp_path}/pixels", f"file://{tmp_path}/latents"
    ray_env = {"RAY_ADDRESS": embedded.ray_gcs}
    r = run_cli(
        "data",
        "ingest",
        "shapes",
        "--out",
        pixels,
        "--limit",
        "16",
        "--shard-size",
        "8",
        "--resolution",
        "16",
        timeout=600,
        env=ray_env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("data", "encode", pixels, "--vae", "identity,downsample=2", "--out", latents, timeout=600, env=ray_env)
    assert r.returncode == 0 and "16 latents (12, 8, 8)" in r.stdout, r.stdout + r.stderr[-2000:]
    r = run_cli("data", "verify", latents, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {latents} (2 shards)"), r.stdout + r.stderr
    shard = next(tmp_path.glob("latents/*.tar"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # the same size, one byte changed
    shard.write_bytes(bytes(data))
    r = run_cli("data", "verify", latents, timeout=300)
    assert r.returncode == 2 and shard.name in r.stderr and "checksum" in r.stderr, r.stdout + r.stderr

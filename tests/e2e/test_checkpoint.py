"""Run-folder housekeeping on a (re)start, on the real embedded S3 server."""

from __future__ import annotations

import json

from ditforge import storage
from ditforge.runs.folder import MANIFEST, all_steps, complete_steps, discard_after, join_step


def test_restart_discards_half_written_steps_newer_than_its_resume_point(s3_prefix):
    run = f"{s3_prefix}/run"
    storage.write_bytes(join_step(run, 10) + f"/{MANIFEST}", b"{}")  # complete
    # a killed attempt's step 20: rank 1's marker made it, rank 0's upload and the manifest did not;
    # left there, that stale marker would let the manifest of a new step 20 go out before rank 1's
    # new upload was done
    storage.write_bytes(join_step(run, 20) + "/_ranks/rank_1.json", json.dumps({"x": {"rank": 1}}).encode())
    storage.write_bytes(join_step(run, 20) + "/mp_rank_00_model_states.pt", b"partial")
    assert discard_after(run, 10) == [20]
    assert all_steps(run) == complete_steps(run) == [10]
    assert discard_after(run, 10) == []  # nothing more to do

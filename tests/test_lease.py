"""The run lease (fcas.synthesis.lease): one driver per out, locally and on a real S3 server (moto)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fcas.io import storage
from fcas.synthesis.lease import LEASE_FILE, LeaseHeld, acquire_lease, read_lease


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    base = request.getfixturevalue("s3_server")
    return f"{base}/lease-{tmp_path.name}"


def test_second_driver_is_refused_until_the_first_releases(out):
    first = acquire_lease(out, heartbeat=False)
    rec = read_lease(out)
    assert rec["token"] == first.token and rec["pid"] == os.getpid()
    with pytest.raises(LeaseHeld, match=r"another driver is running this run .*pid %d" % os.getpid()):
        acquire_lease(out, heartbeat=False)
    assert read_lease(out)["token"] == first.token        # the refusal changed nothing
    first.release()
    assert read_lease(out) is None
    second = acquire_lease(out, heartbeat=False)
    assert second.token != first.token and read_lease(out)["token"] == second.token
    second.release()


def test_stale_heartbeat_is_taken_over_and_the_old_holder_learns_it(out):
    old = acquire_lease(out, ttl=60, heartbeat=False)
    rec = dict(old.record, heartbeat_at=time.time() - 3600)
    storage.atomic_write_bytes(storage.join(out, LEASE_FILE), json.dumps(rec).encode())
    new = acquire_lease(out, ttl=60, heartbeat=False)
    assert read_lease(out)["token"] == new.token != old.token
    old.beat()                       # the old holder's next heartbeat finds the lease gone
    assert old.lost.is_set() and read_lease(out)["token"] == new.token
    old.release()                    # and releasing does not remove the new holder's lease
    assert read_lease(out)["token"] == new.token
    new.release()


def test_heartbeat_thread_keeps_the_lease_fresh(tmp_path):
    out = str(tmp_path / "run")
    lease = acquire_lease(out, ttl=60).start(interval=0.05)
    t0 = read_lease(out)["heartbeat_at"]
    time.sleep(0.4)
    assert read_lease(out)["heartbeat_at"] > t0
    lease.release()
    assert read_lease(out) is None
    assert sorted(os.listdir(out)) == []            # no temporaries or stale copies left


def test_dead_process_on_this_host_is_stale_at_once(tmp_path):
    out = str(tmp_path / "run")
    code = ("import sys; from fcas.synthesis.lease import acquire_lease; "
            "acquire_lease(sys.argv[1], ttl=3600, heartbeat=False)")   # exits without releasing
    subprocess.run([sys.executable, "-c", code, out], check=True)
    dead = read_lease(out)
    assert dead["pid"] != os.getpid()
    lease = acquire_lease(out, ttl=3600, heartbeat=False)
    assert read_lease(out)["token"] == lease.token != dead["token"]
    lease.release()


def test_bad_ttl_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ttl"):
        acquire_lease(str(tmp_path / "run"), ttl=0)

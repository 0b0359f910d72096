"""Virtual board addresses are leased machine-wide: a derived one moves on when taken, a chosen
one is refused naming the holder, and a board process publishes the address it leased."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rig.boards.address_lease import LEASE_DIR_ENV, AddressInUseError, lease_address

HOLD = """
import sys, time
from pathlib import Path
from rig.boards.address_lease import lease_address
lease = lease_address(sys.argv[1], movable=False, holder="'vb9' of /labs/other", directory=Path(sys.argv[2]))
print(lease.address, flush=True)
time.sleep(60)
"""


@pytest.fixture
def other_lab_holds(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A process of another lab holding 127.0.1.200 (flock is per open file: a second process, as in life)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, "127.0.1.200", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "127.0.1.200"
    yield tmp_path
    proc.kill()
    proc.wait()


def test_a_derived_address_moves_to_the_next_free_one(other_lab_holds: Path) -> None:
    lease = lease_address("127.0.1.200", movable=True, holder="'vb1' of /labs/mine", directory=other_lab_holds)
    assert lease.address == "127.0.1.201"
    assert "'vb1' of /labs/mine" in (other_lab_holds / "127.0.1.201").read_text()
    lease.release()


def test_a_chosen_address_in_use_names_the_holder_and_the_fix(other_lab_holds: Path) -> None:
    with pytest.raises(AddressInUseError, match=r"127\.0\.1\.200 is in use by virtual board 'vb9' of /labs/other .*Fix:"):
        lease_address("127.0.1.200", movable=False, holder="'vb1' of /labs/mine", directory=other_lab_holds)


def test_a_derived_address_wraps_past_254_and_a_released_one_is_free_again(tmp_path: Path) -> None:
    first = lease_address("127.0.1.254", movable=True, holder="x", directory=tmp_path)
    second = lease_address("127.0.1.254", movable=True, holder="y", directory=tmp_path)  # another open file: held
    assert (first.address, second.address) == ("127.0.1.254", "127.0.1.2")
    first.release()
    assert lease_address("127.0.1.254", movable=False, holder="z", directory=tmp_path).address == "127.0.1.254"


def test_a_board_process_publishes_the_address_it_leased(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rig.boards.virtual_ports import default_board_address, launch_virtual_board, published_address, stop_virtual_board

    leases = tmp_path / "leases"
    monkeypatch.setenv(LEASE_DIR_ENV, str(leases))
    derived = default_board_address("lease-a")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, derived, str(leases)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == derived
        proc, _url = launch_virtual_board("lease-a", tmp_path / "lab", tmp_path / "lease-a.log")
        try:
            moved = published_address(tmp_path / "lab", "lease-a")
            assert moved is not None and moved != derived
        finally:
            stop_virtual_board(proc)
        with pytest.raises(Exception, match=r"in use by virtual board 'vb9' of /labs/other"):
            launch_virtual_board("lease-b", tmp_path / "lab", tmp_path / "lease-b.log", address=derived)
    finally:
        holder.kill()
        holder.wait()

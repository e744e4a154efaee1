"""Issue 12, D9 and the smaller items: inputs that crashed (OverflowError, KeyError) give clear
errors; numpy integers are sizes and handles; one large ``alloc`` needs bounded temporary memory.

Each case crashed or was refused before the fix."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import labkit
from labkit import exercises
from labkit.cli import main
from labkit.errors import QMPError
from labkit.units import GiB, MiB, parse_size

HUGE = "1" + "0" * 400 + "T"


# --- D9: sizes beyond 2^64 ----------------------------------------------------------------------
@pytest.mark.parametrize("value", [HUGE, 1 << 64, "17179869184G", "0" * 90 + "1" + "0" * 30])
def test_sizes_of_2_to_the_64_or_more_are_a_clear_error(value):
    """QEMU's sizes are uint64 (util/cutils.c do_strtosz: ERANGE above UINT64_MAX); before, the
    string went through float() and raised OverflowError."""
    with pytest.raises(ValueError, match=r"too large: sizes are below 2\^64 bytes"):
        parse_size(value, name="memory")


def test_size_strings_are_parsed_exactly():
    """No float rounding: 2^53 + 1 bytes stays itself; decimals give whole bytes or an error."""
    assert parse_size("9007199254740993") == 2**53 + 1
    assert parse_size("1.5G") == 3 * GiB // 2
    assert parse_size("0.0009765625K") == 1
    assert parse_size("1." + "0" * 5000 + "G") == GiB  # no int-digits limit on trailing zeros
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size("1." + "1" * 5000 + "G")


def test_a_huge_size_is_a_clear_error_in_open_and_in_guest_ops():
    with pytest.raises(ValueError, match="memory .* too large"):
        labkit.open(memory=HUGE)
    vm = labkit.open(memory="256M", seed=0)
    before = vm.mem.counts.copy()
    with pytest.raises(ValueError, match="size .* too large"):
        vm.guest("alloc", size=HUGE)
    assert (vm.mem.counts == before).all()


@pytest.mark.parametrize("flag", ["--memory", "--target"])
def test_a_huge_size_on_the_command_line_is_a_usage_error_not_a_traceback(flag, capsys):
    args = ["balloon", "--memory", "1G", "--target", "512M"]
    args[args.index(flag) + 1] = HUGE
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "too large: sizes are below 2^64 bytes" in err and "Traceback" not in err


# --- D9: a QMP struct argument of the wrong type ------------------------------------------------
def test_blockdev_add_cache_of_the_wrong_type_is_qemus_error():
    """qapi/qobject-input-visitor.c qobject_input_start_struct: "Invalid parameter type for
    'cache', expected: object" (before: KeyError: <class 'dict'>)."""
    vm = labkit.open(memory="256M", seed=0)
    with pytest.raises(QMPError) as e:
        vm.qmp("blockdev-add", driver="file", filename="disk.img", cache="x",
               **{"node-name": "n0"})
    assert e.value.error_class == "GenericError"
    assert str(e.value.desc) == "Invalid parameter type for 'cache', expected: object"


# --- D9: an exercise answer beyond a float ------------------------------------------------------
@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["1e400", "-1e400"])
def test_an_exercise_answer_too_large_for_a_float_is_a_clear_error(value):
    ex = exercises.make("balloon_requests", "alice")
    with pytest.raises(ValueError, match=r"requests must be a finite number, got .*\d+ digits"):
        ex.check({"requests": value, "actual_after": 1})
    assert ex._outcome is None  # rejected before the model ran


# --- numpy integers --------------------------------------------------------------------------------
def test_numpy_integers_are_sizes_and_handles():
    vm = labkit.open(memory="256M", seed=0)
    assert parse_size(np.int64(4 * MiB)) == 4 * MiB and type(parse_size(np.uint32(8))) is int
    h = vm.guest("alloc", size=np.int64(8 * MiB), kind="anon")
    handles = np.array([h])
    vm.guest("touch", handle=handles[0])
    vm.guest("read", handle=np.int32(h))
    vm.guest("free", handle=handles[0])
    assert all(x["handle"] != h for x in vm.guest("handles"))
    with pytest.raises(ValueError, match=r"handle 999 does not exist; live handles are \["):
        vm.guest("touch", handle=np.int64(999))
    with pytest.raises(TypeError):
        parse_size(np.True_)


# --- a bounded alloc -------------------------------------------------------------------------------
def test_one_large_alloc_needs_bounded_temporary_memory():
    """An 8 GiB alloc keeps its page list (8 bytes a page) and, beyond it, needs at most a chunk's
    temporaries: before, ~26 bytes a page more (52 MiB here, 1.7 GiB for 256G)."""
    vm = labkit.open(memory="16G", seed=0, balloon=False)
    pages = 8 * GiB // 4096
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        h = vm.guest("alloc", size="8G", kind="anon")
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept, transient = current - base, peak - current
    assert kept >= 8 * pages  # the handle's PFNs
    assert transient < 16 * MiB, f"{transient / pages:.1f} bytes a page of temporaries"
    resident = next(x["resident"] for x in vm.guest("handles") if x["handle"] == h)
    assert resident == 8 * GiB

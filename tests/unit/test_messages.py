"""restic's JSON output parsed from real captures of 0.14, 0.18 and 0.19 (tests/samples)."""

from __future__ import annotations

import pytest

from fa_restic.restic.features import Feature, ResticVersion, has_feature
from fa_restic.restic.messages import (
    BackupStatus,
    BackupSummary,
    ExitError,
    ItemError,
    RestoreStatus,
    RestoreSummary,
    parse_backup_line,
    parse_missing_source,
    parse_restore_line,
    parse_snapshots,
    parse_stats,
    parse_stderr_line,
)
from tests.unit.samples import load, load_json_lines

# The capture's restic version, from its name ("v19-..."): the last release of that series
# the samples were captured with.
NAME_TO_VERSION = {
    "v14": ResticVersion(0, 14, 0),
    "v18": ResticVersion(0, 18, 0),
    "v19": ResticVersion(0, 19, 1),
}


def _version(sample: str) -> ResticVersion:
    return NAME_TO_VERSION[sample[:3]]


# -- backup ------------------------------------------------------------------------------


def _summary(sample: str) -> BackupSummary:
    messages = [parse_backup_line(line) for line in load(sample).stdout]
    summaries = [message for message in messages if isinstance(message, BackupSummary)]
    assert len(summaries) == 1
    assert isinstance(messages[-1], BackupSummary), "the summary is the last stdout line"
    return summaries[0]


def test_v14_summary_has_a_short_id_and_no_packed_size() -> None:
    summary = _summary("v14-backup-a-abs-json")
    assert summary.snapshot_id == "f9cb9262"
    assert summary.data_added_packed is None
    assert summary.pack_size == summary.data_added == 103131
    assert summary.total_bytes_processed == 100012
    assert summary.total_files_processed == 3
    assert summary.files_new == 3


def test_v18_summary_has_the_full_id_and_the_packed_size() -> None:
    summary = _summary("v18-backup-a-abs-json")
    assert summary.snapshot_id == "74ed5008dc4f4f57c82e73145a0a5537172783afb824546e90ffbb4a6591fd1c"
    assert summary.data_added == 103131
    assert summary.data_added_packed == 102101
    assert summary.pack_size == 102101
    assert summary.total_bytes_processed == 100012


def test_v19_summary_is_like_v18s() -> None:
    summary = _summary("v19-backup-a-abs-json")
    assert summary.snapshot_id == "1f44c6e88d3fd1327f0e6986ace08b5b52cbab1588807760a270c5b114c0c0ed"
    assert summary.data_added == 103123
    assert summary.pack_size == summary.data_added_packed == 102154
    assert summary.total_bytes_processed == 100004
    assert summary.total_files_processed == summary.files_new == 3


def test_v18_summary_of_an_unchanged_tree_has_packed_size_zero() -> None:
    # A packed size of 0 is a real value, not "absent": pack_size must not fall back to data_added.
    line = (
        '{"message_type":"summary","files_new":0,"files_changed":0,"files_unmodified":3,'
        '"data_added":123,"data_added_packed":0,"total_files_processed":3,'
        '"total_bytes_processed":100012,"total_duration":0.5,"snapshot_id":"' + "a" * 64 + '"}'
    )
    summary = parse_backup_line(line)
    assert isinstance(summary, BackupSummary)
    assert summary.pack_size == 0


@pytest.mark.parametrize(
    ("sample", "snapshot_id", "packed"),
    [
        ("v14-backup-c-file-json", "7f704784", 1415),
        ("v18-backup-c-file-json", None, 1155),
        ("v19-backup-c-file-json", None, 1191),
    ],
)
def test_single_file_summaries(sample: str, snapshot_id: str | None, packed: int) -> None:
    summary = _summary(sample)
    assert summary.total_bytes_processed == 100000
    assert summary.pack_size == packed
    if snapshot_id is not None:
        assert summary.snapshot_id == snapshot_id
    else:
        assert len(summary.snapshot_id) == 64


def test_v14_first_status_line_lacks_most_fields() -> None:
    # {"message_type":"status","percent_done":0,"total_files":1,"total_bytes":896340}
    lines = load_json_lines("backup-big-json-v14-2")
    status = parse_backup_line(lines[0])
    assert status == BackupStatus(percent_done=0.0, total_files=1, total_bytes=896340)
    assert status.bytes_done == 0 and status.files_done == 0
    assert status.seconds_remaining is None and status.seconds_elapsed == 0


def test_v18_status_without_totals_still_parses() -> None:
    # restic omits every field that is 0 (NOTES §3).
    status = parse_backup_line(
        '{"message_type":"status","percent_done":0,"files_done":1,"bytes_done":6}'
    )
    assert status == BackupStatus(files_done=1, bytes_done=6)


@pytest.mark.parametrize("sample", ["backup-big-json-v14-2", "backup-big-json-v18-2"])
def test_big_backup_status_lines_then_one_summary(sample: str) -> None:
    messages = [parse_backup_line(line) for line in load_json_lines(sample)]
    statuses = [message for message in messages if isinstance(message, BackupStatus)]
    summaries = [message for message in messages if isinstance(message, BackupSummary)]
    assert len(statuses) >= 5 and len(summaries) == 1
    assert all(0.0 <= status.percent_done <= 1.0 for status in statuses)
    done = [status.bytes_done for status in statuses]
    assert done == sorted(done) and done[-1] > 1_000_000_000
    assert statuses[-1].total_bytes == 1569671100
    assert summaries[0].total_bytes_processed == 1569671100


def test_v19_status_lines_at_2_fps_then_one_summary() -> None:
    # 200 MB in 20 files, RESTIC_PROGRESS_FPS=2 (as the service sets it): a line every 0.5 s.
    sample = load("v19-backup-mid-json-fps2")
    messages = [parse_backup_line(line) for line in sample.stdout]
    statuses = [message for message in messages if isinstance(message, BackupStatus)]
    assert len(statuses) == len(messages) - 1 >= 5
    assert isinstance(messages[-1], BackupSummary)
    assert all(0.0 < status.percent_done < 1.0 for status in statuses)
    done = [status.bytes_done for status in statuses]
    assert done == sorted(done)
    assert {status.total_bytes for status in statuses} == {200_000_000}
    assert statuses[0].seconds_elapsed == 0 and statuses[0].seconds_remaining == 4
    assert statuses[-1].seconds_remaining is None  # omitted when 0
    assert messages[-1].total_bytes_processed == 200_000_000


def test_v18_error_count_on_status_lines() -> None:
    sample = load("v18-err-backup-unreadable-json")
    status = parse_backup_line(sample.stdout[0])
    assert isinstance(status, BackupStatus)
    assert status.error_count == 2


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "no parent snapshot found, will read all files",
        "created restic repository 744f9758ca at /srv/lab/repo14",
        "reading repository password from stdin",
        "\x1b[2Ksignal interrupt received, cleaning up",
        "[0:01] 24.03%  596 files 359.780 MiB, total 2500 files 1.462 GiB, 0 errors ETA 0:03",
        "{not json",
        "[1, 2]",
        '{"message_type":"summary"}',  # no snapshot_id: not a usable summary
        '{"message_type":"status","percent_done":"lots"}',
        '{"message_type":"something_new","percent_done":0.5}',
        '"a JSON string"',
    ],
)
def test_noise_is_not_a_backup_message(line: str) -> None:
    assert parse_backup_line(line) is None


@pytest.mark.parametrize(
    "sample",
    [
        "v14-backup-small-json-verbose",
        "v18-backup-small-json-verbose",
        "v19-backup-small-json-verbose",
    ],
)
def test_verbose_records_are_not_progress(sample: str) -> None:
    """Per-item records (and 0.14's scan_finished record, typed "status") are no progress."""
    messages = [parse_backup_line(line) for line in load(sample).stdout]
    for line, message in zip(load(sample).stdout, messages, strict=True):
        if '"action"' in line:
            assert message is None, line
    assert isinstance(messages[-1], BackupSummary)


def test_init_output_and_password_prompt_are_skipped() -> None:
    # 0.14 prints text; 0.19 an `initialized` JSON record, which is neither progress nor summary.
    for name in ("v14-init-json", "v14-err-no-password-stdin-devnull", "v19-init-json"):
        for line in load(name).stdout:
            assert parse_backup_line(line) is None
            assert parse_restore_line(line) is None


# -- restore -----------------------------------------------------------------------------


def test_v18_restore_summary() -> None:
    messages = [parse_restore_line(line) for line in load("v18-restore-small-json").stdout]
    assert messages == [
        RestoreSummary(total_files=3, files_restored=3, total_bytes=6, bytes_restored=6)
    ]


def test_v19_restore_summary() -> None:
    messages = [parse_restore_line(line) for line in load("v19-restore-small-json").stdout]
    # 0.19 counts folders and the symlink too (9 items; 3 files with 100004 bytes).
    assert messages == [
        RestoreSummary(total_files=9, files_restored=9, total_bytes=100004, bytes_restored=100004)
    ]


def test_v19_restore_again_into_the_same_target_skips() -> None:
    (summary,) = [
        parse_restore_line(line) for line in load("v19-restore-small-json-again-same-target").stdout
    ]
    assert isinstance(summary, RestoreSummary)
    assert summary.files_skipped == 3 and summary.bytes_skipped == 100004
    assert summary.total_bytes == 0 and summary.bytes_restored == 0


def test_v19_restore_status_lines_at_2_fps() -> None:
    messages = [parse_restore_line(line) for line in load("v19-restore-mid-json-fps2").stdout]
    statuses = [m for m in messages if type(m) is RestoreStatus]
    assert len(statuses) == 2 and isinstance(messages[-1], RestoreSummary)
    assert statuses[0] == RestoreStatus(
        percent_done=0.40963927,
        total_files=23,
        files_restored=5,
        total_bytes=200_000_000,
        bytes_restored=81927854,
    )
    assert messages[-1].bytes_restored == 200_000_000 and messages[-1].seconds_elapsed == 1


def test_v18_restore_again_into_the_same_target_skips() -> None:
    (summary,) = [
        parse_restore_line(line) for line in load("v18-restore-small-json-again-same-target").stdout
    ]
    assert isinstance(summary, RestoreSummary)
    assert summary.files_skipped == 1 and summary.bytes_skipped == 6
    assert summary.total_bytes == 0 and summary.bytes_restored == 0


def test_v18_restore_status_lines_and_summary() -> None:
    lines = load_json_lines("restore-big-json-v14-v18")
    messages = [parse_restore_line(line) for line in lines]
    statuses = [m for m in messages if type(m) is RestoreStatus]
    summaries = [m for m in messages if isinstance(m, RestoreSummary)]
    assert statuses[0] == RestoreStatus(
        percent_done=0.062403370999185755,
        total_files=2527,
        files_restored=158,
        total_bytes=1569671100,
        bytes_restored=97952768,
    )
    assert len(summaries) == 1
    assert summaries[0].bytes_restored == 1569671100 and summaries[0].seconds_elapsed == 8


@pytest.mark.parametrize(
    ("sample", "size"),
    [("v18-restore-small-json-vv", 100012), ("v19-restore-small-json-vv", 100004)],
)
def test_verbose_restore_records_are_skipped(sample: str, size: int) -> None:
    messages = [parse_restore_line(line) for line in load(sample).stdout]
    assert len(messages) > 1 and messages[:-1] == [None] * (len(messages) - 1)
    assert isinstance(messages[-1], RestoreSummary) and messages[-1].bytes_restored == size


@pytest.mark.parametrize(
    "sample", ["v14-restore-small-json", "v14-restore-a-abs", "v14-restore-small-json-verify"]
)
def test_v14_restore_prints_only_text(sample: str) -> None:
    stdout = load(sample).stdout
    assert stdout, "0.14 prints a `restoring <Snapshot ...>` line"
    assert [parse_restore_line(line) for line in stdout] == [None] * len(stdout)


# -- stderr ------------------------------------------------------------------------------


def test_v18_exit_error_line() -> None:
    sample = load("v18-err-repo-missing-backup")
    message = parse_stderr_line(sample.stderr[-1])
    assert isinstance(message, ExitError)
    assert message.code == 10 == sample.exit_code
    assert message.message.startswith("Fatal: repository does not exist: unable to open config")
    assert message.message.splitlines()[-1] == "/srv/lab/nonexistent"


@pytest.mark.parametrize(
    "sample",
    [
        "v19-err-repo-missing-backup",
        "v19-err-wrong-password",
        "v19-err-locked-backup",
        "v19-err-locked-snapshots",
        "v19-err-restore-nonexistent-snapshot-json",
        "v19-err-backup-nonexistent-path-json",
        "v19-err-backup-nonexistent-plus-existing-json",
        "v19-err-backup-unreadable-json",
        "v19-err-invalid-env-compression",
        "v19-cancel-SIGINT",
    ],
)
def test_v19_exit_error_line_carries_the_exit_code(sample: str) -> None:
    captured = load(sample)
    message = parse_stderr_line(captured.stderr[-1])
    assert isinstance(message, ExitError)
    assert message.code == captured.exit_code != 0


def test_v19_sigint_exits_130_with_a_canceled_exit_error() -> None:
    sample = load("v19-cancel-SIGINT")
    assert sample.exit_code == 130
    # 0.19 starts its signal line with a carriage return (0.14-0.18: an ANSI erase).
    assert sample.stderr[0] == "\rsignal interrupt received, cleaning up "
    assert parse_stderr_line(sample.stderr[0]) is None
    assert parse_stderr_line(sample.stderr[-1]) == ExitError(
        code=130, message="Fatal: unable to save snapshot: context canceled"
    )
    assert [type(parse_backup_line(line)) for line in sample.stdout] == [BackupStatus]


def test_v18_exit_error_of_an_interrupted_restore() -> None:
    message = parse_stderr_line(
        '{"message_type":"exit_error","code":130,"message":"context canceled"}'
    )
    assert message == ExitError(code=130, message="context canceled")


def test_v14_stderr_is_plain_text() -> None:
    for name in ("v14-err-repo-missing-backup", "v14-err-locked-backup", "v14-err-wrong-password"):
        for line in load(name).stderr:
            assert parse_stderr_line(line) is None


def test_v14_item_errors_name_the_item() -> None:
    sample = load("v14-err-backup-unreadable-json")
    errors = [parse_stderr_line(line) for line in sample.stderr]
    items = [error for error in errors if isinstance(error, ItemError)]
    assert [(item.during, item.item) for item in items] == [
        ("scan", "/srv/lab/unr/data/lockeddir"),
        ("archival", "/srv/lab/unr/data/lockeddir"),
        ("archival", "/srv/lab/unr/data/secret.txt"),
    ]
    # 0.14's error object is empty or a raw Go struct: the text falls back to the item.
    assert items[0].error == {} and items[0].text == "/srv/lab/unr/data/lockeddir"
    assert items[2].error == {"Op": "open", "Path": "/srv/lab/unr/data/secret.txt", "Err": 13}
    assert items[2].text == "/srv/lab/unr/data/secret.txt"
    assert errors[-1] is None  # "Warning: at least one source file could not be read"


def test_v18_item_errors_carry_restics_message() -> None:
    sample = load("v18-err-backup-unreadable-json")
    errors = [parse_stderr_line(line) for line in sample.stderr]
    items = [error for error in errors if isinstance(error, ItemError)]
    assert [item.text for item in items] == [
        "openfile for readdirnames failed: open /srv/lab/unr/data/lockeddir: permission denied",
        "openfile for readdirnames failed: open /srv/lab/unr/data/lockeddir: permission denied",
        "open /srv/lab/unr/data/secret.txt: permission denied",
    ]
    assert errors[-1] == ExitError(
        code=3, message="Warning: at least one source file could not be read"
    )


def test_v19_item_errors_may_come_scan_after_archival() -> None:
    sample = load("v19-err-backup-unreadable-json")
    errors = [parse_stderr_line(line) for line in sample.stderr]
    items = [error for error in errors if isinstance(error, ItemError)]
    assert [(item.during, item.item) for item in items] == [
        ("archival", "/srv/lab/unr/data/lockeddir"),
        ("scan", "/srv/lab/unr/data/lockeddir"),
        ("archival", "/srv/lab/unr/data/secret.txt"),
    ]
    assert items[2].text == "open /srv/lab/unr/data/secret.txt: permission denied"
    assert errors[-1] == ExitError(
        code=3, message="Warning: at least one source file could not be read"
    )
    assert isinstance(parse_backup_line(sample.stdout[-1]), BackupSummary)


@pytest.mark.parametrize(
    "sample",
    [
        "v14-err-backup-nonexistent-plus-existing-json",
        "v18-err-backup-nonexistent-plus-existing-json",
        "v19-err-backup-nonexistent-plus-existing-json",
    ],
)
def test_a_missing_source_beside_an_existing_one(sample: str) -> None:
    """The snapshot is made; the missing path is named on a plain stderr line; 0.19 exits 3."""
    captured = load(sample)
    assert isinstance(parse_backup_line(captured.stdout[-1]), BackupSummary)
    assert parse_missing_source(captured.stderr[0]) == "/srv/does-not-exist"
    incomplete = has_feature(_version(sample), Feature.MISSING_SOURCE_EXIT_3)
    assert captured.exit_code == (3 if incomplete else 0)


@pytest.mark.parametrize(
    "sample",
    [
        "v14-err-backup-nonexistent-path-json",
        "v18-err-backup-nonexistent-path-json",
        "v19-err-backup-nonexistent-path-json",
    ],
)
def test_only_missing_sources_is_a_failure(sample: str) -> None:
    captured = load(sample)
    assert captured.exit_code == 1 and captured.stdout == []
    assert parse_missing_source(captured.stderr[0]) == "/srv/does-not-exist"


def test_other_lines_name_no_missing_source() -> None:
    for line in (
        "",
        "Fatal: all source directories/files do not exist",
        '{"message_type":"exit_error","code":3,"message":"does not exist, skipping"}',
        "\rsignal interrupt received, cleaning up ",
        "does not exist, skipping",
    ):
        assert parse_missing_source(line) is None, line
    assert parse_missing_source("docs/my file does not exist, skipping\r") == "docs/my file"


def test_forget_exit_codes_by_version() -> None:
    # An unknown id: "Ignoring ..." and 0 on every version.
    for name in ("v18-forget-nonexistent-id-json", "v19-forget-nonexistent-id"):
        assert load(name).exit_code == 0
    # A snapshot an append-only rest-server refuses to delete: 0.18 exits 0 (NOTES §13),
    # 0.19 exits 3 with plain text (and a Go stack) on stderr, no JSON.
    sample = load("v19-forget-id-append-only")
    assert has_feature(_version("v19"), Feature.FORGET_FAILURE_EXIT_3)
    assert not has_feature(_version("v18"), Feature.FORGET_FAILURE_EXIT_3)
    assert sample.exit_code == 3
    assert "failed to remove one or more snapshots" in sample.stderr
    assert [parse_stderr_line(line) for line in sample.stderr] == [None] * len(sample.stderr)


def test_stderr_noise_is_skipped() -> None:
    for line in (
        "/srv/does-not-exist does not exist, skipping",
        '{"message_type":"exit_error"}',  # no code
        '{"message_type":"status","percent_done":0.5}',
        "\x1b[2Ksignal interrupt received, cleaning up",
    ):
        assert parse_stderr_line(line) is None, line


# -- snapshots and stats -----------------------------------------------------------------


def test_v14_snapshots_json() -> None:
    snapshots = parse_snapshots("\n".join(load("v14-snapshots-json").stdout))
    assert [snapshot.short_id for snapshot in snapshots] == ["f9cb9262", "b8696e05", "7f704784"]
    assert snapshots[0].id.startswith("f9cb9262") and len(snapshots[0].id) == 64
    assert snapshots[2].paths == ["/srv/ds-small/sub/deeper/c.bin"]
    assert snapshots[0].summary is None and snapshots[0].tags is None
    assert snapshots[0].tag_value("fa:id") is None


def test_v18_snapshots_json_carries_the_summary() -> None:
    snapshots = parse_snapshots("\n".join(load("v18-snapshots-json").stdout))
    assert len(snapshots) == 3
    first = snapshots[0]
    assert first.id == "74ed5008dc4f4f57c82e73145a0a5537172783afb824546e90ffbb4a6591fd1c"
    assert first.summary is not None
    assert first.summary.total_bytes_processed == 100012
    assert first.summary.pack_size == 102101


@pytest.mark.parametrize(
    "sample", ["v14-snapshots-tag-filter", "v18-snapshots-tag-filter", "v19-snapshots-tag-filter"]
)
def test_tagged_snapshot(sample: str) -> None:
    (snapshot,) = parse_snapshots("\n".join(load(sample).stdout))
    assert snapshot.tags == ["fa:id=1", "fa:user=admin"]
    assert snapshot.tag_value("fa:id") == "1"
    assert snapshot.tag_value("fa:user") == "admin"
    assert snapshot.tag_value("fa:other") is None


@pytest.mark.parametrize(
    "sample",
    [
        "v14-snapshots-tag-filter-nomatch",
        "v18-snapshots-tag-filter-nomatch",
        "v19-snapshots-tag-filter-nomatch",
    ],
)
def test_no_matching_snapshot_is_an_empty_list(sample: str) -> None:
    assert parse_snapshots("\n".join(load(sample).stdout)) == []


def test_unknown_snapshot_id_prints_an_empty_list() -> None:
    # restic prints `[]` and an "Ignoring ..." line on stderr, exit 0.
    for name in (
        "v14-err-snapshots-nonexistent-id-json",
        "v18-err-snapshots-nonexistent-id-json",
        "v19-err-snapshots-nonexistent-id-json",
    ):
        assert parse_snapshots("\n".join(load(name).stdout)) == []


def test_v19_snapshot_carries_the_summary() -> None:
    (snapshot,) = parse_snapshots("\n".join(load("v19-snapshots-tag-filter").stdout))
    assert snapshot.short_id == "e36c02f0" and snapshot.id.startswith("e36c02f0")
    assert snapshot.summary is not None
    assert snapshot.summary.total_bytes_processed == 100004
    assert snapshot.summary.pack_size == 0  # nothing new: data_added_packed is 0, not absent


def test_snapshots_output_without_a_list_is_refused() -> None:
    with pytest.raises(ValueError, match="no JSON list"):
        parse_snapshots("reading repository password from stdin\n")
    with pytest.raises(ValueError):
        parse_snapshots('{"not": "a list"}')


@pytest.mark.parametrize(
    ("sample", "size", "count"),
    [
        ("v14-stats-json-snap", 100012, 9),
        ("v18-stats-json-snap", 100012, 9),
        ("v14-stats-json-repo", 500048, 39),
        ("v18-stats-json-repo", 500048, 39),
        ("v18-stats-raw-data-json", 104466, 0),
        ("v19-stats-json-snap", 100004, 9),
    ],
)
def test_stats_json(sample: str, size: int, count: int) -> None:
    stats = parse_stats("\n".join(load(sample).stdout))
    assert (stats.total_size, stats.total_file_count) == (size, count)


def test_stats_output_without_json_is_refused() -> None:
    with pytest.raises(ValueError, match="no JSON object"):
        parse_stats("\n".join(load("v14-stats-text-snap").stdout))

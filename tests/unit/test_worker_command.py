"""The worker wrapper spells the Celery command the README documents, for any node id."""

from hypothesis import given
from hypothesis import strategies as st

from tasks.contract import NODE_ID_PATTERN, node_id_from_hostname, queue_name
from tasks.worker import celery_argv


@given(st.from_regex(NODE_ID_PATTERN, fullmatch=True), st.lists(st.sampled_from(["--loglevel", "INFO", "-E"])))
def test_wrapper_consumes_the_nodes_own_queue_under_its_name(node_id: str, extra: list[str]) -> None:
    argv = celery_argv(node_id, extra)
    assert argv[:4] == ["celery", "-A", "tasks", "worker"]
    assert node_id_from_hostname(argv[argv.index("-n") + 1].replace("%h", "host")) == node_id
    assert argv[argv.index("-Q") + 1] == queue_name(node_id)
    assert argv[argv.index("--pool") + 1] == "solo"
    assert argv[-len(extra) or len(argv) :] == extra

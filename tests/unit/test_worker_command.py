from tasks.worker import celery_argv


def test_wrapper_spells_the_celery_command() -> None:
    assert celery_argv("worker_7", ["--loglevel", "INFO"]) == [
        "celery", "-A", "tasks", "worker", "-n", "worker_7@%h", "-Q", "ringserve.worker_7",
        "--pool", "solo", "--without-mingle", "--without-gossip", "--loglevel", "INFO",
    ]  # fmt: skip

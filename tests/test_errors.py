from stages.errors import ForgeError, fail


def test_fail_reads_file_key_message() -> None:
    error = fail("recipes/x.yaml", "target.gpu", "allowed: a10, l40s")
    assert isinstance(error, ForgeError)
    assert str(error) == "recipes/x.yaml: target.gpu: allowed: a10, l40s"
    assert str(fail(None, "k", "m")) == "k: m"

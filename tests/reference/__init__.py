"""Reference implementations vendored for the tests (see each file's header)."""

"""Test-wide settings."""

from hypothesis import settings

# Two shared cores: wall-clock deadlines would make property tests flaky, not stricter.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")

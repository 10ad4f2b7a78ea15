"""``make test`` runs the suite on pytest-xdist workers with ``--dist loadgroup``: the readers of a shared run (one
group each, ``conftest.SHARED``) are sent to one worker by the group their test id carries. Where pytest drops
that group from the ids, the groups fall apart without an error and every worker makes the shared runs itself."""

import pytest


@pytest.mark.xdist_group("probe")
def test_every_grouped_test_carries_its_group_to_the_scheduler(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only on a pytest-xdist worker under --dist loadgroup")
    grouped = [item for item in request.session.items if item.get_closest_marker("xdist_group")]
    lost = [item.nodeid for item in grouped if "@" not in item.nodeid]
    assert request.node in grouped and not lost, (
        f"pytest {pytest.__version__} dropped the xdist group from {len(lost)} test ids (e.g. {lost[:2]}): "
        "--dist loadgroup does not group them; pyproject.toml pins a pytest that keeps them")

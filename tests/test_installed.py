"""The suite tests the installed wheel, never the source tree next to it."""

import os

import pytest

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where each package's source lives in the checkout; setup.py maps
# legacy/GradientAccumulator to a top-level package of the same wheel.
SOURCES = {"gradaccum": os.path.join(CHECKOUT, "gradaccum"), "GradientAccumulator": os.path.join(CHECKOUT, "legacy")}
pytestmark = [pytest.mark.core, pytest.mark.python]


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_package_is_imported_from_the_installed_wheel(package):
    location = os.path.abspath(__import__(package).__file__)
    assert not location.startswith(SOURCES[package] + os.sep), (
        "{} was imported from the checkout ({}), not from the installed wheel".format(package, location))
    assert "site-packages" in location

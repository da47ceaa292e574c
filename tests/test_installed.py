"""The suite tests the installed wheel, never the source tree next to it."""

import os

import gradaccum

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gradaccum")


def test_gradaccum_is_imported_from_the_installed_wheel():
    location = os.path.abspath(gradaccum.__file__)
    assert not location.startswith(SOURCE + os.sep), (
        "gradaccum was imported from the checkout ({}), not from the installed wheel".format(location))
    assert "site-packages" in location

"""printable(): a peer's text on one line, its control characters shown escaped."""

from dnnpipe.errors import printable


def test_control_and_format_characters_are_escaped_and_the_rest_kept():
    assert printable("[stage 1] disk on fire é 漢") == "[stage 1] disk on fire é 漢"
    hostile = "a\x1b[2J\x1b]0;owned\x07b\nc\rd\x7f\x9b\u202eevil\u2028"
    shown = printable(hostile)
    assert shown == r"a\x1b[2J\x1b]0;owned\x07b\nc\rd\x7f\x9b\u202eevil\u2028"
    assert shown.isprintable()

"""Nothing the command line writes to a pipe or a file is hard-wrapped: a message naming a long path
stays one line (a reader or a test that greps it must not depend on the path's length)."""
from ffnscope.app.console import console


def test_messages_to_a_pipe_stay_one_line(capsys):
    message = "ffnscope: stopped; the last checkpoint in /" + "deep/" * 60 + "small.h5 stands (1 of 4 shards)"
    console().print(message, markup=False, highlight=False)
    console(stderr=True).print(message, markup=False, highlight=False)
    out, err = capsys.readouterr()
    assert out == err == message + "\n"

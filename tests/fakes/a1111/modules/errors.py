"""Mirrors modules/errors.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1: display/report
print and keep going. The fake also records what was displayed, for the tests."""
displayed = []


def display(e, task, *, full_traceback=False):
    displayed.append((task, e))
    print(f"{task}: {type(e).__name__}: {e}")


def report(message, *, exc_info=False):
    displayed.append((message, None))
    print(message)

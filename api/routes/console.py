"""placeholder"""


def install(app):
    return None

"""The one exception type for errors a user can cause."""


class UserError(Exception):
    """Something the user can fix; ``message`` is shown to them as is, in plain words."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

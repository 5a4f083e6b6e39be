"""The one error a sink raises when a batch was not delivered."""

from __future__ import annotations


class DeliveryError(OSError):
    """A batch the receiver did not take. `reason` is a stable short code for health records
    (`http_500`, `http_timeout`, `connection_refused`, `bulk_item_errors`...); the message says
    what happened in words. Never carries record content or a credential."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.reason

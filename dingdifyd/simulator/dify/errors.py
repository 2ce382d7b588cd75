"""Dify's error answers: `DifyHTTPError` carries the status and the JSON body (docs/dify.md#errors); the core's
middleware writes it in the app's dialect."""

from __future__ import annotations

from typing import Any

from dingdifyd.simulator.dify.dialect import Dialect

INTERNAL_SERVER_ERROR = (
    "The server encountered an internal error and was unable to complete your request. "
    "Either the server is overloaded or there is an error in the application."
)
ROUTE_MISMATCH = "Please check if your app mode matches the right API route."
WORKFLOW_MISMATCH = "Please check if your Workflow app mode matches the right API route."
APP_UNAVAILABLE = "App unavailable, please check your app configurations."


class DifyHTTPError(Exception):
    """An error answer, in Dify's JSON shape (the middleware renders it)."""

    def __init__(self, status: int, code: str, message: str, *, params: str | None = None):
        super().__init__(message)
        self.status = status
        # flask-restful's reqparse errors name the field and carry no status
        self.payload: dict[str, Any] = {"code": code, "message": message}
        if params is not None:
            self.payload["params"] = params
        else:
            self.payload["status"] = status


def invalid_param(message: str, params: str | None = None) -> DifyHTTPError:
    return DifyHTTPError(400, "invalid_param", message, params=params)


def not_workflow_app(dialect: Dialect) -> DifyHTTPError:
    """0.15.3 names the Workflow app in the message; 1.16.1 says what it says for chat apps (88b)."""
    return DifyHTTPError(400, "not_workflow_app", ROUTE_MISMATCH if dialect.is_1x else WORKFLOW_MISMATCH)

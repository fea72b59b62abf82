"""FastAPI on async SQLModel: bad input is a 4xx, overload a 503, never a 500.

* ``app.py`` -- ``create_app`` (the factory), ``lifespan``, the module-level ``app``.
* ``dependencies.py`` -- ``get_session`` / ``SessionDep``: a session per request;
  ``ReadSessionDep`` for endpoints of one SELECT.
* ``errors.py`` -- the one map from error to status: handlers, middleware.
* ``schemas.py`` -- request and response models, bounded ids and pages.
* ``idempotency.py`` -- ``answer_once``: a retried transfer moves money once.
* ``background.py`` -- ``AfterResponseDep``: work after the response, in a unit of
  work of its own.
* ``shutdown.py`` -- ``CancelledAs503``: a request cut off by shutdown is a 503.
* ``routers/`` -- ``users.py`` (with the CSV export), ``teams.py``, ``accounts.py``.

``uvicorn asyncpatterns.api:app`` serves the app on ``$DATABASE_URL``. So
``asyncpatterns.api.app`` is the app, not the module ``app.py``
(``importlib.import_module("asyncpatterns.api.app")`` is the module).
"""

from .app import POOL_TIMEOUT, app, create_app, lifespan
from .background import AfterResponse, AfterResponseDep, run_after_response, run_unit_of_work
from .dependencies import ReadSessionDep, SessionDep, get_read_session, get_session
from .errors import (
    UnexpectedErrorsAsJSON,
    database_error,
    database_unavailable,
    request_validation_failed,
)
from .idempotency import IdempotencyKeyHeader, answer_once
from .routers.accounts import create_account_endpoint, read_account_endpoint, transfer_endpoint
from .routers.teams import (
    create_team_endpoint,
    get_or_create_team_endpoint,
    read_team_endpoint,
    read_teams_endpoint,
)
from .routers.users import (
    EMAIL_TAKEN,
    USER_NOT_FOUND,
    ExportCutOff,
    IfMatchHeader,
    StreamingWithCleanup,
    _precondition_refusals,
    create_user_endpoint,
    delete_user_endpoint,
    export_users_endpoint,
    read_user_endpoint,
    read_users_endpoint,
    update_user_endpoint,
)
from .schemas import (
    AccountCreate,
    AccountId,
    AccountRead,
    Deleted,
    ErrorMessage,
    Limit,
    Skip,
    TeamCreate,
    TeamId,
    TeamRead,
    TransferCreate,
    TransferRead,
    UserId,
)

__all__ = [
    "EMAIL_TAKEN",
    "POOL_TIMEOUT",
    "USER_NOT_FOUND",
    "AccountCreate",
    "AccountId",
    "AccountRead",
    "AfterResponse",
    "AfterResponseDep",
    "Deleted",
    "ErrorMessage",
    "ExportCutOff",
    "IdempotencyKeyHeader",
    "IfMatchHeader",
    "Limit",
    "ReadSessionDep",
    "SessionDep",
    "Skip",
    "StreamingWithCleanup",
    "TeamCreate",
    "TeamId",
    "TeamRead",
    "TransferCreate",
    "TransferRead",
    "UnexpectedErrorsAsJSON",
    "UserId",
    "_precondition_refusals",
    "answer_once",
    "app",
    "create_account_endpoint",
    "create_app",
    "create_team_endpoint",
    "create_user_endpoint",
    "database_error",
    "database_unavailable",
    "delete_user_endpoint",
    "export_users_endpoint",
    "get_or_create_team_endpoint",
    "get_read_session",
    "get_session",
    "lifespan",
    "read_account_endpoint",
    "read_team_endpoint",
    "read_teams_endpoint",
    "read_user_endpoint",
    "read_users_endpoint",
    "request_validation_failed",
    "run_after_response",
    "run_unit_of_work",
    "transfer_endpoint",
    "update_user_endpoint",
]

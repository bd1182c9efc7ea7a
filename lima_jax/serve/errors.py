"""OpenAI's error object for every refusal: {"error": {"message", "type", "param", "code"}}, with
the HTTP status OpenAI uses (400 bad request, 401 key, 404 model or path, 413 body, 503 closing).
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
  """A refusal: raised anywhere in a route, answered as OpenAI's error object."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def body(self) -> dict:
    return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param=None, code=None) -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def install(app: FastAPI) -> None:
  """Every error the app can raise answers in OpenAI's shape, never as a traceback."""

  @app.exception_handler(APIError)
  async def _api(_: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(HTTPException)
  async def _http(_: Request, e: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code),
                        status_code=e.status_code, headers=getattr(e, "headers", None))

  @app.exception_handler(RequestValidationError)
  async def _validation(_: Request, e: RequestValidationError):
    return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)

  @app.exception_handler(Exception)
  async def _internal(_: Request, e: Exception):
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"),
                        status_code=500)

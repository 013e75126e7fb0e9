"""Every exception distill4all raises on purpose, in one tree.

    Distill4allError
    ├── UserError            the cause is the user's input: one line on stderr, exit code 2
    │   ├── ConfigError          the run config cannot be read or does not validate
    │   ├── RunDirError          the run directory is missing, locked, or from a newer version
    │   │   └── StoreError           its store cannot be used: damaged, read-only, its disk full or failing
    │   ├── ForeignFileError     a file the run would write exists and the run did not write it
    │   ├── StageError           a stage cannot run as asked (unknown, upstream unfinished, settings changed)
    │   ├── ModelError           a model name or path cannot be resolved or loaded
    │   ├── DataError            an input data file is missing or malformed
    │   ├── TemplateError        a chat template cannot be used with this tokenizer or these examples
    │   ├── ExportError          a checkpoint cannot be exported (architecture, tokenizer, quantization)
    │   ├── ContextLengthError   a prompt does not fit in the model's context window
    │   ├── BudgetReached        the collection budget is spent; what was paid for is stored
    │   ├── TeacherRefused       a teacher refuses every request (401/403, a 404 model or URL)
    │   └── TeacherUnavailable   some answers failed for reasons that may pass; rerun retries them
    └── StageFailure         not the user's doing: a crashed worker, a broken invariant. The runner
        │                    marks the stage failed; the CLI says "internal error", exit code 1
        └── WorkerCrashed        a stage's subprocess (e.g. the training processes) exited abnormally

    TeacherError             one request to a teacher gave no answer (stored as the task's failure,
                             retried on rerun unless `permanent`); it never reaches the CLI

Any other exception is a bug: the runner marks the stage failed and the CLI reports it as an
internal error (exit 1), with the traceback under `--debug`. Three private exceptions are control
flow that never leaves its module: `teacher.client._Retryable` (a request worth retrying),
`collect.sources.RowError` (a source row that gives no prompt: skipped, or a DataError naming its
file and line) and `runtime.server.APIError` (an HTTP error answer, 4xx/5xx JSON).
"""

from __future__ import annotations


class Distill4allError(Exception):
    """Base of every error distill4all raises on purpose."""


class UserError(Distill4allError):
    """Base of every error whose cause is the user's input, not a bug in distill4all."""


class ConfigError(UserError):
    """The run config cannot be read or does not validate."""


class RunDirError(UserError):
    """The run directory is missing, locked by another process, or from a newer version."""


class StoreError(RunDirError):
    """The run store's file or its disk is at fault (damaged, read-only, full, failing): the cause
    lies outside distill4all, and the message names the file."""


class ForeignFileError(UserError):
    """A path a stage would write already holds a file or folder this run did not write."""


class StageError(UserError):
    """A stage name is unknown, or a stage cannot run as asked (e.g. its inputs changed)."""


class ModelError(UserError):
    """A model name or path cannot be resolved or loaded."""


class DataError(UserError):
    """An input data file is missing or malformed."""


class TemplateError(UserError):
    """A template cannot be used with this tokenizer or these examples."""


class ExportError(UserError):
    """A checkpoint cannot be exported (unsupported architecture or tokenizer, failed quantization)."""


class ContextLengthError(UserError):
    """A prompt does not fit in the model's context window."""


class BudgetReached(UserError):
    """The budget is spent; everything paid for is stored and the rest stays pending."""


class TeacherRefused(UserError):
    """A teacher answered 401, 403 or 404: its key, access or model is wrong, so no request of
    the run could succeed. Nothing is stored as failed; the tasks stay pending."""


class TeacherUnavailable(UserError):
    """Answers failed for reasons that may pass (connection refused, timeouts, 5xx, 429 after
    every retry): the stage stays unfinished and a rerun asks for them again."""


class StageFailure(Distill4allError):
    """A stage failed for a reason that is not the user's input (exit code 1, stage marked failed)."""


class WorkerCrashed(StageFailure):
    """A stage's worker process exited abnormally."""


class TeacherError(Distill4allError):
    """A request that gave no answer. `permanent` ones (a 400, a 401…) are not retried on rerun;
    `wait_s`: the teacher asked to wait that long before the next request, past the allowed wait."""

    def __init__(
        self, message: str, *, permanent: bool, status: int | None = None, wait_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status = status
        self.wait_s = wait_s

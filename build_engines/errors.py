"""The errors `cortex build-engine` reports. `str(error)` is one line for a human.

BuildError                  anything that stops a build; the CLI prints it, exit code 2
├── InvalidRequest          bad input: a missing folder, an unsupported model, tp that
│                           does not divide the heads, an impossible INT4 group size
├── StageFailed             a stage raised; the traceback is in the stage's log file
└── NeedsTensorRTLLM        the build stage cannot run here (exit code 3, not a failure
                            of the inputs: rerun inside the named NGC image)
"""

from __future__ import annotations


class BuildError(Exception):
    """A build stopped. The message is one line."""

    exit_code = 2


class InvalidRequest(BuildError):
    """The checkpoint or the flags cannot be built as asked."""


class StageFailed(BuildError):
    """A stage raised an unexpected error."""


class NeedsTensorRTLLM(BuildError):
    """TensorRT-LLM is missing (or the wrong version) here; earlier stages are kept."""

    exit_code = 3

"""Session-wide test setup."""

import signal

# A shell starts background jobs with SIGINT ignored, and an ignored signal
# stays ignored across exec: every peer a test starts would then shrug off the
# Ctrl-C the test sends it (and live on, eating the CPU of later tests).
# Give the run, and so every process it starts, Ctrl-C's usual meaning.
signal.signal(signal.SIGINT, signal.default_int_handler)

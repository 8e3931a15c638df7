"""sendcloud-relay: an SMTP relay and submission gateway in front of SendCloud.

The pipeline, one module per stage: listener → auth / policy → routing → rewrite → spool →
delivery (scheduler, transport, retry) → bounce. See docs/architecture.md.
"""

__version__ = "0.1.0"

"""What operators use on top of the pipeline: the admin HTTP endpoint (``http``), the queue as
operators read it (``queue_view``), and the sending-domain DNS check (``domaincheck``)."""

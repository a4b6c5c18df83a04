"""Replicas sharing one Redis behave as one cache.

- ``leases``: a fetch lease per blob digest in Redis (who fetches from upstream) and the
  record of which replicas hold each committed digest.
- ``peer``: the signed requests between replicas, and ``PeerBlob``, an ``UpstreamBlob``
  whose bytes come from another replica's peer endpoint (its growing temp file, or its
  committed file) from an offset. Following a fetch owned elsewhere is this one thing.
- ``source``: ``ClusterBlobSource``, the ``BlobSource`` wrapper that decides, per fetch,
  whether this replica fetches from upstream, follows the owner, or fills from a holder,
  and takes the lease over when the owner dies.
- ``node``: the cluster membership of this process (identity, secret, session), built by
  the registry when ``cluster`` and ``cache.redis`` are configured.
"""

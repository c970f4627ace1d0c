"""The ``aws`` plugins, on aiobotocore (the optional extra ``aws``; asyncio only): the ``ebs``
source (:mod:`.ebs`, EBS volumes and snapshots through the EBS direct APIs), and the settings,
clients, retries and error translation they share (:mod:`.client`). See docs/aws.md."""

from blockferry.plugins.aws.ebs import EbsSourcePlugin

__all__ = ["EbsSourcePlugin"]

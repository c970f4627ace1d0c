"""The ``aws`` plugins, on aiobotocore (the optional extra ``aws``; asyncio only): the ``ebs``
source (:mod:`.ebs`, EBS volumes and snapshots through the EBS direct APIs), the ``ec2`` source
(:mod:`.ec2`, an instance's volumes from one crash-consistent snapshot set, each read as ``ebs``
reads), and the settings, clients, retries and error translation they share (:mod:`.client`).
See docs/aws.md."""

from blockferry.plugins.aws.ebs import EbsSourcePlugin
from blockferry.plugins.aws.ec2 import Ec2SourcePlugin

__all__ = ["EbsSourcePlugin", "Ec2SourcePlugin"]

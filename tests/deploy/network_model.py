"""Which connections a set of NetworkPolicies allows, evaluated like Kubernetes does for the subset of
the API the chart uses (podSelector/namespaceSelector matchLabels, ipBlock, numeric ports and their
protocols, rules without peers or ports).

A connection from pod A to port P (TCP unless told otherwise) of pod B is allowed when some egress
rule of a policy selecting A admits (B, P) — or no policy selecting A lists Egress — and likewise for
B's ingress. ipBlock peers are taken to mean addresses outside the cluster: `OUTSIDE` stands for some
such address, and an `ipaddress` address for that one (matched against the block's `cidr` and
`except`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# A port no container declares: stands for "any port" in rules without ports.
UNDECLARED_PORT = 12345
OUTSIDE = "outside"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Endpoint:
    name: str
    namespace: str
    labels: Mapping[str, str] = field(hash=False)
    ports: frozenset[int] = frozenset()


Target = Endpoint | str | Address


def _labels_match(selector: Mapping, labels: Mapping[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}


def _in_block(block: Mapping, address: Address) -> bool:
    def holds(cidr: str) -> bool:
        return address in ipaddress.ip_network(cidr)

    return holds(block["cidr"]) and not any(holds(cidr) for cidr in block.get("except", []))


def _peer_matches(peer: Mapping, endpoint: Target, policy_namespace: str) -> bool:
    if isinstance(endpoint, Address):
        return "ipBlock" in peer and _in_block(peer["ipBlock"], endpoint)
    if "ipBlock" in peer:
        return endpoint == OUTSIDE
    if endpoint == OUTSIDE:
        return False
    if "namespaceSelector" in peer:
        if not _labels_match(peer["namespaceSelector"], namespace_labels(endpoint.namespace)):
            return False
    elif endpoint.namespace != policy_namespace:
        return False
    return _labels_match(peer.get("podSelector", {}), endpoint.labels)


def _rule_admits(
    rule: Mapping, peers_key: str, other: Target, port: int, namespace: str, protocol: str = "TCP"
) -> bool:
    peers = rule.get(peers_key)
    if peers is not None and not any(_peer_matches(peer, other, namespace) for peer in peers):
        return False
    ports = rule.get("ports")
    if ports is None:
        return True
    for entry in ports:
        assert isinstance(entry.get("port"), int), f"only numeric ports are modelled: {entry}"
    return any(entry["port"] == port and entry.get("protocol", "TCP") == protocol for entry in ports)


@dataclass
class NetworkModel:
    policies: list[Mapping]

    def _selecting(self, endpoint: Endpoint, policy_type: str) -> list[Mapping]:
        return [
            policy
            for policy in self.policies
            if policy["metadata"].get("namespace", endpoint.namespace) == endpoint.namespace
            and policy_type in policy["spec"].get("policyTypes", ["Ingress"])
            and _labels_match(policy["spec"]["podSelector"], endpoint.labels)
        ]

    def is_isolated(self, endpoint: Endpoint) -> bool:
        return bool(self._selecting(endpoint, "Ingress")) and bool(self._selecting(endpoint, "Egress"))

    def egress_allowed(self, source: Endpoint, target: Target, port: int, protocol: str = "TCP") -> bool:
        policies = self._selecting(source, "Egress")
        return not policies or any(
            _rule_admits(rule, "to", target, port, source.namespace, protocol)
            for policy in policies
            for rule in policy["spec"].get("egress", [])
        )

    def ingress_allowed(self, target: Endpoint, source: Endpoint, port: int) -> bool:
        policies = self._selecting(target, "Ingress")
        return not policies or any(
            _rule_admits(rule, "from", source, port, target.namespace)
            for policy in policies
            for rule in policy["spec"].get("ingress", [])
        )

    def allowed(self, source: Endpoint, target: Endpoint, port: int) -> bool:
        return self.egress_allowed(source, target, port) and self.ingress_allowed(target, source, port)

    def open_ports(self, source: Endpoint, target: Endpoint) -> set[int]:
        candidates = set(target.ports) | {UNDECLARED_PORT}
        return {port for port in candidates if self.allowed(source, target, port)}

    def flows(self, sources: Iterable[Endpoint], targets: Iterable[Endpoint]) -> set[tuple[str, str]]:
        targets = list(targets)
        return {
            (source.name, target.name)
            for source in sources
            for target in targets
            if self.open_ports(source, target)
        }

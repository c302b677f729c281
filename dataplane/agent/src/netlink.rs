//! Interface addresses, link state, and routes to workload prefixes (in
//! Weft's own routing table, with one rule per family) through rtnetlink,
//! applied by diff. One netlink handle for the whole agent (the kernel
//! answers EBUSY to a second concurrent dump on one socket).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, anyhow};
use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{AddressMessageBuilder, Handle, IpVersion, LinkUnspec, RouteMessageBuilder};
use tracing::info;
use weft_dataplane_core::plan::{AddressAction, plan_addresses};
use weft_dataplane_core::routes::{
    Family, ROUTE_PROTOCOL, RULE_PRIORITY, RouteAction, RouteState, desired_state, plan_routes,
};

/// `header.table` of a route or rule whose table id is in an attribute.
const RT_TABLE_COMPAT: u8 = 252;
/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// The agent's netlink handle.
#[derive(Debug, Clone)]
pub(crate) struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the netlink connection (its task runs on the current runtime).
    pub(crate) fn open() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    async fn link_index(&self, ifname: &str) -> Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(ifname.to_string())
            .execute();
        let link = links
            .try_next()
            .await
            .with_context(|| format!("looking up interface {ifname}"))?
            .ok_or_else(|| anyhow!("interface {ifname} not found"))?;
        Ok(link.header.index)
    }

    /// Addresses currently on the interface.
    pub(crate) async fn addresses(&self, ifname: &str) -> Result<Vec<IpNet>> {
        let index = self.link_index(ifname).await?;
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.context("listing addresses")? {
            if msg.header.index != index {
                continue;
            }
            let addr = msg.attributes.iter().find_map(|a| {
                if let AddressAttribute::Address(ip) = a {
                    Some(*ip)
                } else {
                    None
                }
            });
            if let Some(net) = addr.and_then(|ip| IpNet::new(ip, msg.header.prefix_len).ok()) {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Brings the interface to exactly `desired` addresses (link-local ones
    /// stay), sets the MTU and brings it up. Idempotent.
    pub(crate) async fn apply_interface(
        &self,
        ifname: &str,
        desired: &[IpNet],
        mtu: u16,
    ) -> Result<()> {
        let index = self.link_index(ifname).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(u32::from(mtu))
                    .up()
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("setting {ifname} up with MTU {mtu}"))?;
        let observed = self.addresses(ifname).await?;
        for action in plan_addresses(desired, &observed) {
            match action {
                AddressAction::Add(net) => {
                    let r = self
                        .handle
                        .address()
                        .add(index, net.addr(), net.prefix_len())
                        .execute()
                        .await;
                    match r {
                        Ok(()) => info!(interface = ifname, address = %net, "address added"),
                        Err(e) if is_errno(&e, libc::EEXIST) => {}
                        Err(e) => {
                            return Err(e).with_context(|| format!("adding {net} to {ifname}"));
                        }
                    }
                }
                AddressAction::Remove(net) => {
                    let msg = match net.addr() {
                        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
                            .index(index)
                            .address(a, net.prefix_len())
                            .build(),
                        IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
                            .index(index)
                            .address(a, net.prefix_len())
                            .build(),
                    };
                    match self.handle.address().del(msg).execute().await {
                        Ok(()) => info!(interface = ifname, address = %net, "address removed"),
                        Err(e)
                            if is_errno(&e, libc::EADDRNOTAVAIL) || is_errno(&e, libc::ENOENT) => {}
                        Err(e) => {
                            return Err(e).with_context(|| format!("removing {net} from {ifname}"));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Netlink {
    /// Weft's routes (in `table`, marked with [`ROUTE_PROTOCOL`], out of
    /// `ifname`) and rules ([`RULE_PRIORITY`], looking up `table`) as they
    /// are in the kernel, with the stale rules themselves (not exempting
    /// `fwmark`); everything else is ignored.
    async fn weft_routes(
        &self,
        ifname: &str,
        table: u32,
        fwmark: u32,
    ) -> Result<(RouteState, Vec<RuleMessage>)> {
        let index = self.link_index(ifname).await?;
        let mut state = RouteState::default();
        let mut stale = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut stream = self.handle.route().get(query).execute();
            while let Some(msg) = stream.try_next().await.context("listing routes")? {
                if route_table(&msg) != table
                    || msg.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
                    || !msg.attributes.contains(&RouteAttribute::Oif(index))
                {
                    continue;
                }
                let dst = msg.attributes.iter().find_map(|a| {
                    if let RouteAttribute::Destination(d) = a {
                        route_address(d)
                    } else {
                        None
                    }
                });
                if let Some(net) =
                    dst.and_then(|a| IpNet::new(a, msg.header.destination_prefix_length).ok())
                {
                    state.routes.insert(net);
                }
            }
        }
        for (version, family) in [(IpVersion::V4, Family::V4), (IpVersion::V6, Family::V6)] {
            let mut stream = self.handle.rule().get(version).execute();
            while let Some(msg) = stream.try_next().await.context("listing rules")? {
                if !is_weft_rule(&msg, table) {
                    continue;
                }
                if exempts(&msg, fwmark) {
                    state.rules.insert(family);
                } else {
                    state.stale_rules.insert(family);
                    stale.push(msg);
                }
            }
        }
        Ok((state, stale))
    }

    /// The host's own underlay, which no route of Weft's may capture: the
    /// addresses (as host prefixes) of every interface but `weft_ifname`,
    /// and the main table's routes with a destination (not the default
    /// route) that do not go out of `weft_ifname`.
    pub(crate) async fn underlay(&self, weft_ifname: &str) -> Result<Vec<IpNet>> {
        let weft = self.link_index(weft_ifname).await.ok();
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Some(msg) = stream.try_next().await.context("listing addresses")? {
            if Some(msg.header.index) == weft {
                continue;
            }
            for a in &msg.attributes {
                if let AddressAttribute::Address(ip) = a {
                    out.push(IpNet::from(*ip));
                }
            }
        }
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut stream = self.handle.route().get(query).execute();
            while let Some(msg) = stream.try_next().await.context("listing routes")? {
                let out_of_weft =
                    weft.is_some_and(|w| msg.attributes.contains(&RouteAttribute::Oif(w)));
                if route_table(&msg) != RT_TABLE_MAIN
                    || msg.header.destination_prefix_length == 0
                    || out_of_weft
                {
                    continue;
                }
                let dst = msg.attributes.iter().find_map(|a| {
                    if let RouteAttribute::Destination(d) = a {
                        route_address(d)
                    } else {
                        None
                    }
                });
                if let Some(net) =
                    dst.and_then(|a| IpNet::new(a, msg.header.destination_prefix_length).ok())
                {
                    out.push(net.trunc());
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Brings Weft's routes into `ifname` in `table`, and the rules looking
    /// it up (for packets without `fwmark`; every packet when it is 0), to
    /// exactly `routes` by diff. Idempotent; routes and rules Weft did not
    /// create are never touched; Weft's rules without the `fwmark`
    /// exemption (older agents) are replaced.
    pub(crate) async fn apply_routes(
        &self,
        ifname: &str,
        table: u32,
        routes: &[IpNet],
        fwmark: u32,
    ) -> Result<()> {
        let index = self.link_index(ifname).await?;
        let (observed, stale) = self.weft_routes(ifname, table, fwmark).await?;
        for action in plan_routes(&desired_state(routes), &observed) {
            match action {
                RouteAction::AddRule(family) => {
                    let mut add = self
                        .handle
                        .rule()
                        .add()
                        .table_id(table)
                        .priority(RULE_PRIORITY)
                        .action(RuleAction::ToTable);
                    let msg = add.message_mut();
                    msg.attributes
                        .push(RuleAttribute::Protocol(RouteProtocol::Other(
                            ROUTE_PROTOCOL,
                        )));
                    if fwmark != 0 {
                        msg.attributes.push(RuleAttribute::FwMark(fwmark));
                        msg.attributes.push(RuleAttribute::FwMask(u32::MAX));
                        msg.header.flags |= RuleFlags::Invert;
                    }
                    let r = match family {
                        Family::V4 => add.v4().execute().await,
                        Family::V6 => add.v6().execute().await,
                    };
                    match r {
                        Ok(()) => {
                            info!(
                                ?family,
                                table,
                                priority = RULE_PRIORITY,
                                fwmark,
                                "routing rule added (packets with the fwmark are exempt)"
                            );
                        }
                        Err(e) if is_errno(&e, libc::EEXIST) => {}
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("adding the {family:?} rule for table {table}")
                            });
                        }
                    }
                }
                RouteAction::RemoveStaleRule(family) => {
                    for msg in stale.iter().filter(|m| rule_family(m) == Some(family)) {
                        match self.handle.rule().del(msg.clone()).execute().await {
                            Ok(()) => info!(
                                ?family,
                                table, "stale routing rule (no fwmark exemption) removed"
                            ),
                            Err(e) if is_errno(&e, libc::ENOENT) => {}
                            Err(e) => {
                                return Err(e).with_context(|| {
                                    format!("removing a stale {family:?} rule for table {table}")
                                });
                            }
                        }
                    }
                }
                RouteAction::RemoveRule(family) => {
                    let mut msg = RuleMessage::default();
                    msg.header.family = match family {
                        Family::V4 => AddressFamily::Inet,
                        Family::V6 => AddressFamily::Inet6,
                    };
                    msg.header.action = RuleAction::ToTable;
                    msg.header.table = RT_TABLE_COMPAT;
                    msg.attributes.push(RuleAttribute::Table(table));
                    msg.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
                    msg.attributes
                        .push(RuleAttribute::Protocol(RouteProtocol::Other(
                            ROUTE_PROTOCOL,
                        )));
                    if fwmark != 0 {
                        msg.attributes.push(RuleAttribute::FwMark(fwmark));
                        msg.attributes.push(RuleAttribute::FwMask(u32::MAX));
                        msg.header.flags |= RuleFlags::Invert;
                    }
                    match self.handle.rule().del(msg).execute().await {
                        Ok(()) => info!(?family, table, "routing rule removed"),
                        Err(e) if is_errno(&e, libc::ENOENT) => {}
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("removing the {family:?} rule for table {table}")
                            });
                        }
                    }
                }
                RouteAction::AddRoute(net) => {
                    match self
                        .handle
                        .route()
                        .add(route_message(net, index, table))
                        .execute()
                        .await
                    {
                        Ok(()) => info!(route = %net, interface = ifname, table, "route added"),
                        Err(e) if is_errno(&e, libc::EEXIST) => {}
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("adding the route {net} via {ifname} to table {table}")
                            });
                        }
                    }
                }
                RouteAction::RemoveRoute(net) => {
                    match self
                        .handle
                        .route()
                        .del(route_message(net, index, table))
                        .execute()
                        .await
                    {
                        Ok(()) => info!(route = %net, interface = ifname, table, "route removed"),
                        Err(e) if is_errno(&e, libc::ESRCH) || is_errno(&e, libc::ENOENT) => {}
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("removing the route {net} from table {table}")
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A route of `net` out of interface `index` in `table`, marked as Weft's.
fn route_message(net: IpNet, index: u32, table: u32) -> RouteMessage {
    let protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    match net {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .table_id(table)
            .protocol(protocol)
            .scope(RouteScope::Link)
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .table_id(table)
            .protocol(protocol)
            .build(),
    }
}

/// An IP address of a route attribute.
fn route_address(a: &RouteAddress) -> Option<IpAddr> {
    if let RouteAddress::Inet(v4) = a {
        Some(IpAddr::V4(*v4))
    } else if let RouteAddress::Inet6(v6) = a {
        Some(IpAddr::V6(*v6))
    } else {
        None
    }
}

/// The table of a route: the attribute if present, else the header's.
fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| {
            if let RouteAttribute::Table(t) = a {
                Some(*t)
            } else {
                None
            }
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// Whether a rule is Weft's: our priority, looking up our table.
fn is_weft_rule(msg: &RuleMessage, table: u32) -> bool {
    let rule_table = msg
        .attributes
        .iter()
        .find_map(|a| {
            if let RuleAttribute::Table(t) = a {
                Some(*t)
            } else {
                None
            }
        })
        .unwrap_or(u32::from(msg.header.table));
    rule_table == table
        && msg.header.action == RuleAction::ToTable
        && msg
            .attributes
            .contains(&RuleAttribute::Priority(RULE_PRIORITY))
}

/// Whether one of Weft's rules is the current one: it matches only packets
/// without `fwmark` (or, with `fwmark` 0, every packet).
fn exempts(msg: &RuleMessage, fwmark: u32) -> bool {
    let mark = msg.attributes.iter().find_map(|a| {
        if let RuleAttribute::FwMark(m) = a {
            Some(*m)
        } else {
            None
        }
    });
    let mask = msg.attributes.iter().find_map(|a| {
        if let RuleAttribute::FwMask(m) = a {
            Some(*m)
        } else {
            None
        }
    });
    let inverted = msg.header.flags.contains(RuleFlags::Invert);
    if fwmark == 0 {
        mark.unwrap_or(0) == 0 && !inverted
    } else {
        mark == Some(fwmark) && mask.unwrap_or(u32::MAX) == u32::MAX && inverted
    }
}

/// The family of a rule.
fn rule_family(msg: &RuleMessage) -> Option<Family> {
    if msg.header.family == AddressFamily::Inet {
        Some(Family::V4)
    } else if msg.header.family == AddressFamily::Inet6 {
        Some(Family::V6)
    } else {
        None
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    if let rtnetlink::Error::NetlinkError(m) = e {
        m.code.map(|c| c.get().abs()) == Some(errno)
    } else {
        false
    }
}

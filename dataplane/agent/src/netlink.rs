//! Interface addresses and link state through rtnetlink, applied by diff.
//! One netlink handle for the whole agent (the kernel answers EBUSY to a
//! second concurrent dump on one socket).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, anyhow};
use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use rtnetlink::{AddressMessageBuilder, Handle, LinkUnspec};
use tracing::info;
use weft_dataplane_core::plan::{AddressAction, plan_addresses};

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

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    if let rtnetlink::Error::NetlinkError(m) = e {
        m.code.map(|c| c.get().abs()) == Some(errno)
    } else {
        false
    }
}

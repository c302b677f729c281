//! Kernel routes for workload prefixes: Weft's own routing table, one
//! policy rule per address family pointing to it, and the plan that
//! brings the observed routes and rules to the desired ones.
//!
//! Weft never touches a route or rule it did not create: the agent
//! observes only routes of its table marked with [`ROUTE_PROTOCOL`] and
//! rules with [`RULE_PRIORITY`] looking up its table.
//!
//! The rule exempts the tunnel's own packets: it matches only packets
//! *without* Weft's mark ([`DEFAULT_FWMARK`], `not fwmark M lookup T`),
//! and the agent marks its WireGuard, probe and controller sockets, so no
//! route in Weft's table can capture the traffic that carries the overlay.
//! Rules at Weft's priority and table without that mark (older agents, or
//! another mark) are stale: the new rule is added first, then they go.

use std::collections::BTreeSet;

use ipnet::IpNet;

/// Weft's routing table for workload prefixes (the default of
/// `weft-agent --route-table`).
pub const DEFAULT_ROUTE_TABLE: u32 = 51820;

/// Priority of the rule that sends every lookup through Weft's table: after
/// the local table (0), before main (32766), so a workload prefix wins over
/// a main-table default route. Lookups that match nothing in Weft's table
/// fall through to the next rule.
pub const RULE_PRIORITY: u32 = 5182;

/// The route protocol (`proto 87` in `ip route`) that marks Weft's routes
/// (and its rules).
pub const ROUTE_PROTOCOL: u8 = 87;

/// Default of `weft-agent --fwmark`: the mark on the agent's own sockets
/// (WireGuard, probes, controller) that Weft's rule does not match. 51820
/// (0xca6c), the mark wg-quick gives its own tunnel for the same purpose.
pub const DEFAULT_FWMARK: u32 = 51820;

/// An address family, for the per-family rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of a prefix.
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// Weft's routes and rules as observed in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteState {
    /// Routes in Weft's table into the overlay interface.
    pub routes: BTreeSet<IpNet>,
    /// Families that have Weft's rule.
    pub rules: BTreeSet<Family>,
    /// Families with a rule at Weft's priority looking up Weft's table
    /// that is not the current one (no mark exemption, or another mark):
    /// left by an older agent, replaced.
    pub stale_rules: BTreeSet<Family>,
}

/// A change to Weft's routes and rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAction {
    /// Add the rule of a family (lookup Weft's table).
    AddRule(Family),
    /// Remove the stale rules of a family (after the current one is in).
    RemoveStaleRule(Family),
    /// Route a prefix into the overlay interface in Weft's table.
    AddRoute(IpNet),
    /// Remove a route of Weft's table.
    RemoveRoute(IpNet),
    /// Remove the rule of a family (its last route is gone).
    RemoveRule(Family),
}

/// The state wanted for `routes`: each route once, and a rule for every
/// family with a route.
pub fn desired_state(routes: &[IpNet]) -> RouteState {
    let routes: BTreeSet<IpNet> = routes.iter().map(IpNet::trunc).collect();
    let rules = routes.iter().map(Family::of).collect();
    RouteState {
        routes,
        rules,
        stale_rules: BTreeSet::new(),
    }
}

/// Actions that turn `observed` into `desired`, in a safe order: rules are
/// added first and removed last, stale rules go once the current rule of
/// their family is in, stale routes go before new ones are added. Routes
/// and rules already in place produce no action.
pub fn plan_routes(desired: &RouteState, observed: &RouteState) -> Vec<RouteAction> {
    let mut actions: Vec<RouteAction> = desired
        .rules
        .difference(&observed.rules)
        .map(|f| RouteAction::AddRule(*f))
        .collect();
    actions.extend(
        observed
            .stale_rules
            .difference(&desired.stale_rules)
            .map(|f| RouteAction::RemoveStaleRule(*f)),
    );
    actions.extend(
        observed
            .routes
            .difference(&desired.routes)
            .map(|r| RouteAction::RemoveRoute(*r)),
    );
    actions.extend(
        desired
            .routes
            .difference(&observed.routes)
            .map(|r| RouteAction::AddRoute(*r)),
    );
    actions.extend(
        observed
            .rules
            .difference(&desired.rules)
            .map(|f| RouteAction::RemoveRule(*f)),
    );
    actions
}

/// Applies route actions to a model of the kernel's state.
pub fn apply_route_actions(state: &mut RouteState, actions: &[RouteAction]) {
    for action in actions {
        match *action {
            RouteAction::AddRule(f) => {
                state.rules.insert(f);
            }
            RouteAction::RemoveRule(f) => {
                state.rules.remove(&f);
            }
            RouteAction::RemoveStaleRule(f) => {
                state.stale_rules.remove(&f);
            }
            RouteAction::AddRoute(r) => {
                state.routes.insert(r);
            }
            RouteAction::RemoveRoute(r) => {
                state.routes.remove(&r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NETS: [&str; 6] = [
        "100.100.2.0/24",
        "100.100.3.0/24",
        "100.100.0.0/16",
        "fd00:beef:2::/64",
        "fd00:beef:3::/64",
        "fd00:beef::/48",
    ];

    fn net(i: usize) -> IpNet {
        NETS[i % NETS.len()].parse().expect("valid prefix")
    }

    fn families(v4: bool, v6: bool) -> BTreeSet<Family> {
        [(v4, Family::V4), (v6, Family::V6)]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| f)
            .collect()
    }

    fn state_strategy() -> impl Strategy<Value = RouteState> {
        (
            proptest::collection::btree_set(0..NETS.len(), 0..6),
            any::<(bool, bool, bool, bool)>(),
        )
            .prop_map(|(routes, (v4, v6, stale4, stale6))| RouteState {
                routes: routes.into_iter().map(net).collect(),
                rules: families(v4, v6),
                stale_rules: families(stale4, stale6),
            })
    }

    proptest! {
        #[test]
        fn applying_the_plan_yields_desired_and_a_second_plan_is_empty(
            wanted in proptest::collection::vec(0..NETS.len(), 0..8),
            mut observed in state_strategy(),
        ) {
            let routes: Vec<IpNet> = wanted.into_iter().map(net).collect();
            let desired = desired_state(&routes);
            let actions = plan_routes(&desired, &observed);
            apply_route_actions(&mut observed, &actions);
            prop_assert_eq!(&observed, &desired);
            prop_assert!(plan_routes(&desired, &observed).is_empty());
        }

        #[test]
        fn a_route_is_never_added_without_its_rule_nor_a_rule_removed_before_its_routes(
            wanted in proptest::collection::vec(0..NETS.len(), 0..8),
            observed in state_strategy(),
        ) {
            let desired = desired_state(&wanted.into_iter().map(net).collect::<Vec<_>>());
            let mut model = observed.clone();
            for action in plan_routes(&desired, &observed) {
                apply_route_actions(&mut model, &[action]);
                if let RouteAction::AddRoute(r) = action {
                    prop_assert!(model.rules.contains(&Family::of(&r)), "{:?} before its rule", r);
                }
                if let RouteAction::RemoveRule(f) = action {
                    prop_assert!(model.routes.iter().all(|r| Family::of(r) != f));
                }
                // A stale rule goes only once the current one is in, so
                // routed traffic never falls through to main meanwhile.
                if let RouteAction::RemoveStaleRule(f) = action
                    && desired.rules.contains(&f)
                {
                    prop_assert!(model.rules.contains(&f), "stale {:?} rule removed first", f);
                }
            }
            prop_assert!(model.stale_rules.is_empty(), "stale rules left: {:?}", model.stale_rules);
        }
    }

    #[test]
    fn rules_follow_the_families_of_the_routes() {
        let d = desired_state(&[net(0), net(1)]);
        assert_eq!(d.rules, [Family::V4].into_iter().collect());
        let observed = RouteState {
            routes: [net(3)].into_iter().collect(),
            rules: [Family::V6].into_iter().collect(),
            stale_rules: [Family::V4].into_iter().collect(),
        };
        assert_eq!(
            plan_routes(&d, &observed),
            vec![
                RouteAction::AddRule(Family::V4),
                RouteAction::RemoveStaleRule(Family::V4),
                RouteAction::RemoveRoute(net(3)),
                RouteAction::AddRoute(net(0)),
                RouteAction::AddRoute(net(1)),
                RouteAction::RemoveRule(Family::V6),
            ]
        );
        assert!(plan_routes(&d, &d).is_empty());
    }
}

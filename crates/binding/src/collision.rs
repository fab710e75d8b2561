//! When two listening sockets take the same address, as the kernel counts
//! it: the one rule `--check` (the generator's clash check), `status` and
//! the recovery step use to find two units on one address.
//!
//! Addresses are compared as `systemctl show -p Listen` writes them
//! (without the ` (Stream)`): a path expanded, `@name` for an abstract
//! name, `IP:PORT` or `[IPv6]:PORT`. systemd shows a bare port
//! (`ListenStream=2222`) as `[::]:2222`, a dual-stack wildcard, which takes
//! the port on every IPv4 address too; so text alone misses most clashes
//! of an old hand-written unit with a line's `127.0.0.1:PORT`.

use std::net::{IpAddr, SocketAddr};

/// Whether sockets listening on `a` and `b` take the same address: the
/// same path or abstract name; or the same TCP port on the same IP, or on
/// a wildcard (`0.0.0.0`, `[::]`) on either side, with IPv4-mapped IPv6
/// addresses compared as IPv4.
///
/// A wildcard of the other family counts as a clash too (`[::]:P` and
/// `0.0.0.0:P`): systemd's `[::]` sockets are dual-stack
/// (`BindIPv6Only=default` follows the kernel's default, which is both).
pub fn addresses_collide(a: &str, b: &str) -> bool {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) {
        (Ok(a), Ok(b)) => {
            let (ia, ib) = (plain(a.ip()), plain(b.ip()));
            a.port() == b.port() && (ia == ib || ia.is_unspecified() || ib.is_unspecified())
        }
        (Err(_), Err(_)) => a == b,
        // A TCP address never takes a path or a name.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_collide_as_the_kernel_counts_them() {
        assert!(addresses_collide("127.0.0.1:22", "127.0.0.1:22"));
        assert!(addresses_collide("127.0.0.1:22", "0.0.0.0:22"));
        assert!(addresses_collide("0.0.0.0:22", "127.0.0.1:22"));
        assert!(addresses_collide("[::]:22", "127.0.0.1:22"));
        assert!(addresses_collide("[::]:22", "0.0.0.0:22"));
        assert!(addresses_collide("[::]:22", "[::1]:22"));
        assert!(addresses_collide("[::ffff:127.0.0.1]:22", "127.0.0.1:22"));
        assert!(!addresses_collide("127.0.0.1:22", "127.0.0.2:22"));
        assert!(!addresses_collide("127.0.0.1:22", "127.0.0.1:23"));
        assert!(!addresses_collide("[::]:22", "127.0.0.1:23"));
        assert!(!addresses_collide("[::1]:22", "127.0.0.1:22"));
    }

    #[test]
    fn paths_and_names_collide_when_equal() {
        assert!(addresses_collide("/run/user/1/a", "/run/user/1/a"));
        assert!(!addresses_collide("/run/user/1/a", "/run/user/1/b"));
        assert!(addresses_collide("@name", "@name"));
        assert!(!addresses_collide("@name", "/name"));
        assert!(!addresses_collide("@name", "[::]:22"));
    }
}

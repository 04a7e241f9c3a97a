//! Free TCP ports on the loopback interface, for brokers and devices a test starts.

/// A port that was free a moment ago on 127.0.0.1 (the OS picks it; it can be taken again
/// before the caller binds it, which the suites accept).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

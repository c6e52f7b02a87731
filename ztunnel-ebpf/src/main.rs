//! Pod-scoped traffic capture: `connect4`/`connect6` and `sock_ops` on each enrolled pod's
//! cgroup steer outbound TCP into the proxy's 15001 listener; `sk_lookup` on each enrolled
//! pod's netns steers inbound TCP to the proxy's 15006 listener. The decisions themselves are
//! in `ztunnel_common::verdict`, shared with userspace and its tests.
#![no_std]
#![no_main]

mod capture;
mod log;
mod maps;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

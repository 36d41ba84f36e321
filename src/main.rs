//! vhost-gpu-nc: a vhost-user virtio-gpu device backend with native GPU
//! compute contexts.
#![allow(dead_code)] // until the virtio-gpu layer lands

mod compute;
mod native;

fn main() {
    eprintln!("vhost-gpu-nc: not yet functional");
    std::process::exit(1);
}

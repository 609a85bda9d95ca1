//! A minimal NBD client handshake, enough to ask a server for its export
//! list (`NBD_OPT_LIST`) and leave politely (`NBD_OPT_ABORT`). `pflex up`
//! uses it to know the volume really serves before it says "ready".

use anyhow::{bail, Result};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;

/// Export names the server at `addr` lists.
pub async fn list_exports(addr: impl ToSocketAddrs) -> Result<Vec<String>> {
    tokio::time::timeout(Duration::from_secs(5), list_inner(addr))
        .await
        .map_err(|_| anyhow::anyhow!("NBD handshake timed out"))?
}

async fn list_inner(addr: impl ToSocketAddrs) -> Result<Vec<String>> {
    let mut s = TcpStream::connect(addr).await?;
    if s.read_u64().await? != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
        bail!("not a newstyle NBD server");
    }
    if s.read_u16().await? & FLAG_FIXED_NEWSTYLE == 0 {
        bail!("NBD server is not fixed-newstyle");
    }
    s.write_u32(CLIENT_FIXED_NEWSTYLE).await?;
    send_option(&mut s, OPT_LIST).await?;
    let mut names = Vec::new();
    loop {
        if s.read_u64().await? != REPLY_MAGIC {
            bail!("bad NBD option reply magic");
        }
        let _opt = s.read_u32().await?;
        let kind = s.read_u32().await?;
        let len = s.read_u32().await? as usize;
        if len > 1 << 20 {
            bail!("NBD option reply too long ({len} bytes)");
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).await?;
        match kind {
            REP_ACK => break,
            REP_SERVER if len >= 4 => {
                let n = u32::from_be_bytes(data[..4].try_into()?) as usize;
                let name = data.get(4..4 + n).ok_or_else(|| anyhow::anyhow!("bad name length"))?;
                names.push(String::from_utf8_lossy(name).into_owned());
            }
            other if other & 0x8000_0000 != 0 => bail!("NBD_OPT_LIST refused (reply {other:#x})"),
            _ => {}
        }
    }
    send_option(&mut s, OPT_ABORT).await?;
    Ok(names)
}

async fn send_option(s: &mut TcpStream, opt: u32) -> Result<()> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&b).await?;
    Ok(())
}

/// Whether `export` is among the exports listed at `addr`.
pub async fn export_listed(addr: impl ToSocketAddrs, export: &str) -> Result<bool> {
    Ok(list_exports(addr).await?.iter().any(|n| n == export))
}

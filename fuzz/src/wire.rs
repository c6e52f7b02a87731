//! The HBONE server's side of the wire, read back: the HTTP/2 frames it wrote and the
//! `:status` of each response (HEADERS and CONTINUATION frames joined, HPACK decoded with one
//! decoder for the connection, as a client does).

use loona_hpack::Decoder;

const FRAME_HEADER_LEN: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// One frame as written; `payload` is whole (a frame cut off by the end of the output is left
/// out).
pub struct Frame<'a> {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: &'a [u8],
}

/// The frames in `output`, in order.
pub fn frames(mut output: &[u8]) -> Vec<Frame<'_>> {
    let mut frames = Vec::new();
    while output.len() >= FRAME_HEADER_LEN {
        let len =
            (usize::from(output[0]) << 16) | (usize::from(output[1]) << 8) | usize::from(output[2]);
        let Some(payload) = output.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
            break;
        };
        let stream = u32::from_be_bytes([output[5], output[6], output[7], output[8]]) & 0x7fff_ffff;
        frames.push(Frame {
            kind: output[3],
            flags: output[4],
            stream,
            payload,
        });
        output = &output[FRAME_HEADER_LEN + len..];
    }
    frames
}

/// A response the server sent: the stream and its `:status` (None: a header block without one,
/// such as trailers).
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub stream: u32,
    pub status: Option<String>,
}

/// Every header block the server sent, decoded, in order; also whether it sent DATA on a
/// stream (`data_streams`). Errors name what does not decode: the server must only write
/// well-formed frames.
pub fn responses(output: &[u8]) -> Result<(Vec<Response>, Vec<u32>), String> {
    let mut decoder = Decoder::new();
    // The client's SETTINGS may let the server's encoder use a larger table than the default.
    decoder.set_max_allowed_table_size(u32::MAX as usize);
    let mut responses = Vec::new();
    let mut data_streams = Vec::new();
    // The header block being collected: its stream and fragments so far.
    let mut block: Option<(u32, Vec<u8>)> = None;
    for frame in frames(output) {
        let fragment = match (frame.kind, &mut block) {
            (HEADERS, None) => {
                block = Some((frame.stream, Vec::new()));
                header_fragment(&frame)?
            }
            (CONTINUATION, Some((stream, _))) if *stream == frame.stream => frame.payload,
            (_, Some((stream, _))) => {
                return Err(format!(
                    "frame type {} on stream {} inside the header block of stream {stream}",
                    frame.kind, frame.stream
                ));
            }
            (CONTINUATION, None) => {
                return Err(format!(
                    "CONTINUATION on stream {} without a header block",
                    frame.stream
                ));
            }
            (DATA, None) => {
                data_streams.push(frame.stream);
                continue;
            }
            (_, None) => continue,
        };
        let Some((stream, collected)) = &mut block else {
            unreachable!("a fragment belongs to a block");
        };
        collected.extend_from_slice(fragment);
        if frame.flags & END_HEADERS == 0 {
            continue;
        }
        let stream = *stream;
        let headers = decoder.decode(collected).map_err(|err| {
            format!("the header block on stream {stream} does not decode: {err:?}")
        })?;
        let status = headers
            .iter()
            .find(|(name, _)| name == b":status")
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned());
        responses.push(Response { stream, status });
        block = None;
    }
    Ok((responses, data_streams))
}

/// A HEADERS frame's header block fragment: without its padding and priority fields.
fn header_fragment<'a>(frame: &Frame<'a>) -> Result<&'a [u8], String> {
    let mut payload = frame.payload;
    let mut padding = 0;
    if frame.flags & PADDED != 0 {
        let (&pad, rest) = payload
            .split_first()
            .ok_or("a padded HEADERS frame without its pad length")?;
        padding = usize::from(pad);
        payload = rest;
    }
    if frame.flags & PRIORITY != 0 {
        payload = payload
            .get(5..)
            .ok_or("a HEADERS frame too short for its priority")?;
    }
    payload
        .len()
        .checked_sub(padding)
        .map(|len| &payload[..len])
        .ok_or_else(|| "a HEADERS frame with more padding than payload".to_owned())
}

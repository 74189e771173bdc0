//! The protobuf codec of every generated service and client: tonic's prost codec with a
//! smaller first buffer.
//!
//! tonic gives every call an encode buffer and a decode buffer when the call starts, each of
//! `BufferSettings::buffer_size` (8 KiB by default), and a long-lived stream keeps both for
//! its whole life. A broker holds one `Transport` stream per connected agent instance, nearly
//! all of them idle, so those two buffers were most of an idle session's memory (about
//! 16 of 26 KiB). The buffers still grow to fit any message (`max_message_bytes` bounds that),
//! so a smaller start only costs a reallocation when a message is larger than it.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The first capacity of each call's encode and decode buffer: room for a typical envelope.
pub const INITIAL_BUFFER_BYTES: usize = 1024;

/// tonic's default: an encoded batch is handed to HTTP/2 once it is this large.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// `application/grpc+proto` through prost, as [`tonic_prost::ProstCodec`], with buffers that
/// start at [`INITIAL_BUFFER_BYTES`]. Named by the code generator (`codec_path`).
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}

"""`coordtok encode` and `decode`: a video to a token file and back, on a server (--server) or in
this process."""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from coordtok.service.commands.common import add_command, add_model_options, add_server_options, with_client


def add_to(commands) -> None:
    encode = add_command(commands, "encode", "a video file -> a token file")
    encode.add_argument("video", help="the video file (any container and codec FFmpeg reads)")
    encode.add_argument("-o", "--output", required=True, help="the token file: .safetensors, .npz or .json")
    add_server_options(encode)
    add_model_options(encode, in_process_only=True)
    encode.add_argument("--resize", choices=["crop", "pad", "stretch"], default="crop", help="how frames are fitted to the model's size")
    encode.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: the video's)")
    encode.add_argument("--start", type=float, default=0.0, help="the first second to encode")
    encode.add_argument("--end", type=float, default=None, help="the second to stop at (default: the end)")
    encode.set_defaults(run=cmd_encode)

    decode = add_command(commands, "decode", "a token file -> a video")
    decode.add_argument("tokens", help="a token file (.safetensors, .npz or .json) from encode or the server")
    decode.add_argument("-o", "--output", required=True, help="the video: .mp4 (H.264), .webm (VP9) or .npy (uint8 frames)")
    add_server_options(decode)
    add_model_options(decode, in_process_only=True)
    decode.add_argument("--frames", type=frame_range, default=None, metavar="A:B", help="decode frames A to B - 1 only (default: all)")
    decode.add_argument("--fps", type=float, default=None, help="frame rate of the video (default: the source's)")
    decode.add_argument("--restore-size", action="store_true",
                        help="scale back to the source size (tokens encoded with --resize pad or stretch)")
    decode.set_defaults(run=cmd_decode)


def cmd_encode(args: argparse.Namespace) -> int:
    from coordtok.formats import tokens

    fmt = _token_format_of(args.output)
    if not Path(args.video).is_file():
        raise FileNotFoundError(f"no video at {args.video}")
    if args.end is not None and args.end <= args.start:
        raise ValueError(f"--end ({args.end:g} s) must come after --start ({args.start:g} s)")
    result = asyncio.run(with_client(args, lambda c: c.encode(args.video, resize=args.resize, fps=args.fps,
                                                              start=args.start or None, end=args.end)))
    Path(args.output).write_bytes(tokens.serialise(result, fmt))
    print(f"wrote {args.output}: {result.clips} clip(s), frames {result.metadata.get('n_frames')}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from coordtok.formats import tokens
    from coordtok.formats.video_write import OUTPUT_FORMATS

    fmt = Path(args.output).suffix.lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"{args.output}: the output ends in {_either(OUTPUT_FORMATS)}")
    parsed = tokens.parse(Path(args.tokens).read_bytes(), _token_format_of(args.tokens), None, max_clips=1 << 20)
    data = asyncio.run(with_client(args, lambda c: c.decode(parsed, frames=args.frames, fmt=fmt, fps=args.fps,
                                                              restore_size=args.restore_size)))
    Path(args.output).write_bytes(data)
    print(f"wrote {args.output} ({len(data):,} bytes)")
    return 0


def _token_format_of(path: str) -> str:
    from coordtok.formats.tokens import FORMATS

    suffix = Path(path).suffix.lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"{path}: token files end in {_either(FORMATS)}")
    return suffix


def _either(formats) -> str:
    """Format names as file endings: '.a, .b or .c'."""
    *others, last = [f".{name}" for name in formats]
    return f"{', '.join(others)} or {last}"


def frame_range(value: str) -> tuple[int, int]:
    """argparse type of --frames: A:B, frames A to B - 1."""
    first, colon, end = value.partition(":")
    try:
        a, b = int(first), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes A:B, the first frame and the frame after the last (e.g. 0:16), "
                                         f"not {value!r}") from None
    if a < 0:
        raise argparse.ArgumentTypeError(f"{value}: frames are numbered from 0")
    if b <= a:
        raise argparse.ArgumentTypeError(f"{value}: the range is {'reversed' if b < a else 'empty'}; A:B decodes frames "
                                         f"A to B - 1, so B must be greater than A (e.g. {min(a, b)}:{max(a, b + 1)})")
    return a, b

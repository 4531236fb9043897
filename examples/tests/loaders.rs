//! The CIFAR-10 and text loaders on generated files, and their errors on bad files.

use std::path::Path;

use ballast_examples::{
    cifar::{self, Cifar10, CifarError, IMAGE_BYTES, RECORD_BYTES},
    text::{self, TextError, TextSet},
};
use burn::tensor::Device;

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn cifar_generated_set_round_trips_through_the_binary_format() {
    let d = dir();
    let path = cifar::write_synthetic(d.path(), 50, 7).unwrap();
    let file = path.join("data_batch_1.bin");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 50 * RECORD_BYTES as u64);
    let set = Cifar10::load(&path).unwrap();
    assert_eq!(set.len(), 50);
    for i in 0..50 {
        let label = (i % 10) as u8;
        assert_eq!(set.label(i), label);
        assert_eq!(set.image(i), cifar::synthetic_image(label, 7 + i as u64).as_slice());
    }
    let (x, y) = set.batch(&[3, 0, 49], &Device::flex());
    assert_eq!(x.dims(), [3, 3, 32, 32]);
    let labels: Vec<i64> = y.into_data().iter::<i64>().collect();
    assert_eq!(labels, vec![3, 0, 9]);
    let pixels: Vec<f32> = x.into_data().iter::<f32>().collect();
    assert!(pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
    // The first pixel of image 3, red channel, scaled.
    let expected = f32::from(set.image(3)[0]) / 127.5 - 1.0;
    assert_eq!(pixels[0], expected);
}

#[test]
fn cifar_directory_reads_batches_in_name_order() {
    let d = dir();
    let a = cifar::encode(&[(1, vec![1; IMAGE_BYTES]), (2, vec![2; IMAGE_BYTES])]);
    let b = cifar::encode(&[(9, vec![9; IMAGE_BYTES])]);
    std::fs::write(d.path().join("data_batch_2.bin"), &b).unwrap();
    std::fs::write(d.path().join("data_batch_1.bin"), &a).unwrap();
    std::fs::write(d.path().join("test_batch.bin"), &b).unwrap(); // not a training batch
    let set = Cifar10::load(d.path()).unwrap();
    assert_eq!(set.len(), 3);
    assert_eq!((set.label(0), set.label(1), set.label(2)), (1, 2, 9));
    assert_eq!(set.image(2)[0], 9);
    assert_eq!(set.files().len(), 2);
}

fn cifar_err(path: &Path) -> String {
    let e: CifarError = Cifar10::load(path).expect_err("must be refused");
    e.to_string()
}

#[test]
fn bad_input_cifar_wrong_size() {
    let d = dir();
    let f = d.path().join("data_batch_1.bin");
    std::fs::write(&f, vec![0u8; RECORD_BYTES * 2 + 5]).unwrap();
    let e = cifar_err(&f);
    assert!(e.contains("is 6151 bytes, not a multiple of 3073"), "{e}");
}

#[test]
fn bad_input_cifar_truncated() {
    let d = dir();
    let path = cifar::write_synthetic(d.path(), 20, 1).unwrap();
    let f = path.join("data_batch_1.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1000]).unwrap();
    let e = cifar_err(&path);
    assert!(e.contains("not a multiple of 3073") && e.contains("truncated"), "{e}");
}

#[test]
fn bad_input_cifar_empty_file() {
    let d = dir();
    let f = d.path().join("data_batch_1.bin");
    std::fs::write(&f, b"").unwrap();
    assert!(cifar_err(&f).contains("is empty"));
}

#[test]
fn bad_input_cifar_label_out_of_range() {
    let d = dir();
    let f = d.path().join("data_batch_1.bin");
    std::fs::write(
        &f,
        cifar::encode(&[(3, vec![0; IMAGE_BYTES]), (12, vec![0; IMAGE_BYTES])]),
    )
    .unwrap();
    let e = cifar_err(&f);
    assert!(e.contains("record 1 has label 12") && e.contains("CIFAR-100"), "{e}");
}

#[test]
fn bad_input_cifar_directory_without_batches() {
    let d = dir();
    std::fs::write(d.path().join("readme.txt"), b"hi").unwrap();
    let e = cifar_err(d.path());
    assert!(e.contains("no data_batch_*.bin file in"), "{e}");
}

#[test]
fn bad_input_cifar_missing_path() {
    let d = dir();
    let e = cifar_err(&d.path().join("nope.bin"));
    assert!(
        e.contains("cannot read CIFAR-10 data at") && e.contains("--data"),
        "{e}"
    );
}

#[test]
fn text_windows_and_next_byte_targets() {
    let d = dir();
    let f = d.path().join("t.txt");
    std::fs::write(&f, "abcdefghij").unwrap();
    let set = TextSet::load(&f, 3, false).unwrap();
    assert_eq!(set.len(), 3); // abcd, defg, ghij
    assert_eq!(set.window(1), b"defg");
    let (x, y) = set.batch(&[2, 0], &Device::flex());
    assert_eq!(x.dims(), [2, 3]);
    let xs: Vec<i64> = x.into_data().iter::<i64>().collect();
    let ys: Vec<i64> = y.into_data().iter::<i64>().collect();
    let b = |s: &str| s.bytes().map(i64::from).collect::<Vec<_>>();
    assert_eq!(xs, [b("ghi"), b("abc")].concat());
    assert_eq!(ys, [b("hij"), b("bcd")].concat());
}

#[test]
fn text_generated_corpus_is_utf8_and_loads() {
    let d = dir();
    let f = text::write_synthetic(d.path(), 5000, 3).unwrap();
    let set = TextSet::load(&f, 32, false).unwrap();
    assert_eq!(set.len(), (5000 - 1) / 32);
    assert_eq!(text::synthetic_text(5000, 3), std::fs::read_to_string(&f).unwrap());
}

#[test]
fn bad_input_text_not_utf8() {
    let d = dir();
    let f = d.path().join("t.bin");
    std::fs::write(&f, b"first line\nsecond \xff\xfe line\n").unwrap();
    let e: TextError = TextSet::load(&f, 4, false).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("is not UTF-8 text: invalid byte 0xff at offset 18 (line 2)"),
        "{msg}"
    );
    assert!(msg.contains("--allow-binary"), "{msg}");
    // Accepted as raw bytes when asked.
    assert!(TextSet::load(&f, 4, true).is_ok());
}

#[test]
fn bad_input_text_too_short() {
    let d = dir();
    let f = d.path().join("t.txt");
    std::fs::write(&f, "short").unwrap();
    let msg = TextSet::load(&f, 64, false).unwrap_err().to_string();
    assert!(msg.contains("has 5 bytes but one training sequence needs 65"), "{msg}");
}

#[test]
fn bad_input_text_zero_sequence_length() {
    let d = dir();
    let f = d.path().join("t.txt");
    std::fs::write(&f, "some text").unwrap();
    assert!(TextSet::load(&f, 0, false)
        .unwrap_err()
        .to_string()
        .contains("--seq-len must be at least 1"));
}

#[test]
fn bad_input_text_missing_file() {
    let d = dir();
    let msg = TextSet::load(&d.path().join("none.txt"), 8, false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("cannot read text at"), "{msg}");
}

/// The binaries turn loader errors into a message and exit code 2, and write nothing.
#[test]
fn bad_input_data_file_through_the_binaries() {
    let d = dir();
    std::fs::write(d.path().join("cut.bin"), vec![0u8; 5000]).unwrap();
    std::fs::write(d.path().join("bin.txt"), b"\x00\x9f\x92\x96 not text").unwrap();
    for (bin, data, expected) in [
        (env!("CARGO_BIN_EXE_resnet"), "cut.bin", "not a multiple of 3073"),
        (env!("CARGO_BIN_EXE_transformer"), "bin.txt", "is not UTF-8 text"),
    ] {
        let out = std::process::Command::new(bin)
            .args(["--data", data, "--steps", "2"])
            .current_dir(d.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(expected), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !d.path().join("runs").exists(),
            "nothing is written for a refused input"
        );
    }
}
